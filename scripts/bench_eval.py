"""Images per second of `mmgradcam eval` on the default captioner, and what batching buys.

    python scripts/bench_eval.py --data data/shapes --split test --images 256

Side by side in one run on the same images: the eval pipeline's path (a batch of images, captions
generated together, all words of all captions from one forward and one batched backward) and the
naive path (one image at a time, one forward and backward per word). Scoring is included in the
pipeline figure.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import mmgradcam as mg
from mmgradcam.data.shapes import read_split
from mmgradcam.eval.pipeline import EvalConfig, Evaluation
from mmgradcam.eval.wordnet import wordnet
from mmgradcam.tasks import captioning
from mmgradcam.tasks.captioning import word_targets


def naive(captioner, images: list[Image.Image]) -> int:
    """One image at a time, one forward and backward per word: what per-target tools do."""
    words = 0
    for image in images:
        caption = captioner.generate(image)
        tokens = captioner.tokenize(caption)
        inputs, _ = captioner.preprocess(image)
        model_inputs = captioner.batch_inputs(inputs["pixel_values"], [tokens])
        per_word, _ = word_targets(tokens)
        for target in per_word:
            mg.explain(captioner.model, model_inputs, [target], captioner.default_layer)
            words += 1
    return words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--naive-images", type=int, default=32)
    args = parser.parse_args()

    split = read_split(args.data, args.split)
    out = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        config = EvalConfig(instances=str(args.data / f"instances_{args.split}.json"), images=str(split["images_dir"]),
                            out=str(out), limit=args.images, batch_size=args.batch_size)
        evaluation = Evaluation(config, progress=False)
        evaluation.captioner  # load the model and WordNet (one-time costs) outside the timing
        wordnet()
        finish, finish_started = evaluation.finish, []

        def timed_finish():
            finish_started.append(time.perf_counter())
            return finish()

        evaluation.finish = timed_finish
        start = time.perf_counter()
        evaluation.run()
        pipeline_time = time.perf_counter() - start
        batches_time = finish_started[0] - start
        words = json.loads((out / "summary.json").read_text())["words_scored"]
    finally:
        shutil.rmtree(out, ignore_errors=True)

    captioner = captioning.load("default")
    files = [split["images_dir"] / info["file_name"] for info in split["instances"]["images"][:args.naive_images]]
    images = [Image.open(f).convert("RGB") for f in files]
    start = time.perf_counter()
    naive_words = naive(captioner, images)
    naive_time = time.perf_counter() - start

    print(f"default captioner, {torch.get_num_threads()} threads, {args.split} split")
    print(f"eval pipeline : {args.images} images in {batches_time:.1f} s = {args.images / batches_time:.1f} images/s "
          f"(batch {args.batch_size}, {words} words scored, captions generated, scoring and baselines included)")
    print(f"                + {pipeline_time - batches_time:.1f} s once at the end (summary, bootstrap CIs, plots): "
          f"{args.images / pipeline_time:.1f} images/s overall")
    print(f"per-word loop : {len(images)} images in {naive_time:.1f} s = {len(images) / naive_time:.1f} images/s "
          f"({naive_words} word maps, no scoring)")
    print(f"speed-up      : {(args.images / batches_time) / (len(images) / naive_time):.1f}x")


if __name__ == "__main__":
    main()
