"""Images per second of `mmgradcam eval` against its bound, and where the pipeline's time goes.

    OMP_NUM_THREADS=1 python scripts/bench_eval.py --data data/shapes --split test --images 128 --batch-size 16

In one run on the same images, after the model, WordNet and one warm-up batch are loaded:

(a) the pipeline: the real ``Evaluation`` on a temporary out directory (decode in DataLoader
    workers, generate captions, explain every scorable word from one forward and one batched
    backward, score, write); images/s of its batch loop (the one-time summary is shown apart);
(b) its bound: the same model, batch size, captions and words (those the pipeline explained,
    recorded from its own calls), pixels preloaded on the model's device: one forward and the
    batched backward per batch (``captioner.explain_pixels``), nothing else;
(c) the ratio (a) / (b);
(d) the pipeline's time per stage (``Evaluation.stage_seconds``: decode, generate, explain, score,
    write) against its loop's wall time.

``--naive-images N`` also times the per-word loop (one image at a time, one forward and backward
per word, no scoring) on N images, as earlier versions of this script did.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import mmgradcam as mg
from mmgradcam.data.shapes import read_split
from mmgradcam.eval.pipeline import STAGES, EvalConfig, Evaluation
from mmgradcam.eval.wordnet import wordnet
from mmgradcam.tasks.captioning import word_targets


def naive(captioner, images: list[Image.Image]) -> int:
    """One image at a time, one forward and backward per word: what per-target tools do."""
    words = 0
    for image in images:
        caption = captioner.generate(image)
        tokens = captioner.tokenize(caption)
        inputs, _ = captioner.preprocess(image)
        model_inputs = captioner.to_device(captioner.batch_inputs(inputs["pixel_values"], [tokens]))
        per_word, _ = word_targets(tokens, device=captioner.device)
        for target in per_word:
            mg.explain(captioner.model, model_inputs, [target], captioner.default_layer)
            words += 1
    return words


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: the eval's)")
    parser.add_argument("--device", default="auto", help="where the model runs (auto, cpu, cuda, cuda:N, mps)")
    parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"],
                        help="the forwards' precision (autocast)")
    parser.add_argument("--naive-images", type=int, default=0, help="also time the per-word loop on N images")
    args = parser.parse_args()

    split = read_split(args.data, args.split)
    out = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        config = EvalConfig(instances=str(args.data / f"instances_{args.split}.json"), images=str(split["images_dir"]),
                            out=str(out), limit=args.images, batch_size=args.batch_size, workers=args.workers,
                            device=args.device, dtype=None if args.dtype == "float32" else args.dtype)
        evaluation = Evaluation(config, progress=False)
        captioner = evaluation.captioner  # one-time costs outside the timing: the model, WordNet, a batch
        wordnet()
        methods = evaluation.methods("captions")
        evaluation.process_batch(0)
        evaluation.stage_seconds = dict.fromkeys(STAGES, 0.0)
        evaluation.thumbnails.maps = {}

        # record what the pipeline explains (pixels, captions, word choice, methods), to replay it
        calls = []
        explain_pixels = captioner.explain_pixels

        def recording(pixel_values, geometries, captions, **options):
            calls.append((pixel_values, geometries, list(captions), options))
            return explain_pixels(pixel_values, geometries, captions, **options)

        captioner.explain_pixels = recording
        finish, finish_started = evaluation.finish, []

        def timed_finish():
            finish_started.append(time.perf_counter())
            return finish()

        evaluation.finish = timed_finish
        start = time.perf_counter()
        evaluation.run()
        pipeline_time = time.perf_counter() - start
        captioner.explain_pixels = explain_pixels
        loop_time = evaluation.loop_seconds
        finish_time = pipeline_time - (finish_started[0] - start)
        words = json.loads((out / "summary.json").read_text())["words_scored"]
        stages = dict(evaluation.stage_seconds)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    # (b) the bound: the same pixels (already on the model's device), captions, words and methods
    explained = sum(len(options["select"](captioner.tokenize(c).words))
                    for _, _, captions, options in calls for c in captions)
    synchronize(captioner.device)
    start = time.perf_counter()
    for pixel_values, geometries, captions, options in calls:
        captioner.explain_pixels(pixel_values, geometries, captions, **options)
    synchronize(captioner.device)
    bound_time = time.perf_counter() - start

    images = len(evaluation.image_ids)
    pipeline_rate, bound_rate = images / loop_time, images / bound_time
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{captioner.name} on {captioner.device} ({args.dtype or 'float32'}), {torch.get_num_threads()} torch "
          f"threads (OMP_NUM_THREADS={threads}), {evaluation.workers} decode workers, {args.split} split, "
          f"{images} images, batch {args.batch_size}, methods {','.join(methods)}")
    print(f"(a) pipeline : {images / loop_time:6.1f} images/s  ({loop_time:.1f} s; {words} words scored, "
          f"{explained} explained; + {finish_time:.1f} s once for summary and CIs: "
          f"{images / pipeline_time:.1f} images/s overall)")
    print(f"(b) bound    : {bound_rate:6.1f} images/s  ({bound_time:.1f} s; one forward + batched backward over "
          f"the same {explained} words per batch, pixels preloaded)")
    print(f"(c) ratio    : {pipeline_rate / bound_rate:6.2f}")
    print(f"(d) stages   : " + ", ".join(f"{name} {stages[name]:.2f} s ({100 * stages[name] / loop_time:.0f}%)"
                                          for name in STAGES)
          + f"; sum {sum(stages.values()):.2f} s of the loop's {loop_time:.2f} s")

    if args.naive_images:
        files = [split["images_dir"] / info["file_name"]
                 for info in split["instances"]["images"][:args.naive_images]]
        pils = [Image.open(f).convert("RGB") for f in files]
        start = time.perf_counter()
        naive_words = naive(captioner, pils)
        naive_time = time.perf_counter() - start
        print(f"per-word loop: {len(pils) / naive_time:6.1f} images/s  ({len(pils)} images, {naive_words} word "
              f"maps, no scoring)")


if __name__ == "__main__":
    main()
