"""Per-word caption maps: one word, all words batched, and the per-word loop, side by side.

    python scripts/bench_caption.py                 # BLIP-base-sized random model at 384 px + the default captioner
    python scripts/bench_caption.py --skip-blip     # only the default captioner
    python scripts/bench_caption.py --skip-blip --method relevance   # or attention-gradcam, or a CAM method
    python scripts/bench_caption.py --device cuda --dtype bfloat16    # on a GPU (the card is printed)

"One word" is a single target (one forward, one backward). "All words, batched" is our path:
one forward and one batched backward for every word. "Per-word loop" is what tools without
batching do: a full forward and backward per word. The maps of the two all-word paths are
checked equal (1e-5).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

import mmgradcam as mg
from mmgradcam.tasks import captioning
from mmgradcam.engine.device import resolve_device
from mmgradcam.engine.registry import is_attention_method
from mmgradcam.tasks.captioning import word_readout, word_targets

CAPTION = "a man in a red shirt rides a bike down the street"  # 11 words


def blip_base_captioner(device: torch.device | str = "cpu", dtype: str | None = None):
    """A BLIP-base-sized BlipForConditionalGeneration with random weights (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(CAPTION.split()))
    words += [f"tok{i}" for i in range(30524 - len(words) - 1)] + ["[DEC]"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", bos_token="[DEC]", model_max_length=512)
    torch.manual_seed(0)
    config = BlipConfig(text_config={"vocab_size": len(words), "bos_token_id": vocab["[DEC]"], "pad_token_id": 0,
                                     "sep_token_id": 3, "eos_token_id": 3})
    model = BlipForConditionalGeneration(config).eval()
    return captioning.load(model, tokenizer=tokenizer, image_processor=BlipImageProcessor(), device=device, dtype=dtype)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: time it to the end


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(name: str, captioner, image: Image.Image, caption: str, repeats: int, method: str = "gradcam") -> None:
    tokens = captioner.tokenize(caption)
    inputs, _ = captioner.preprocess(image)
    model_inputs = captioner.to_device(captioner.batch_inputs(inputs["pixel_values"], [tokens]))
    per_word, _ = word_targets(tokens, captioner.text_logits_from_end, device=captioner.device)
    layer, options = captioner.resolve_layer(None), dict(captioner.layer_options)
    rows = model_inputs[getattr(captioner, "input_key", "input_ids")].shape[1]
    if is_attention_method(method):  # the attention methods read the model's attention, not a layer
        options["attention"] = captioner.attention_graph(model_inputs)

    def run(targets):
        extra = {"readout": word_readout(targets, rows)} if "attention" in options else {}
        return mg.explain(captioner.model, model_inputs, targets, layer, method, dtype=captioner.dtype,
                          **options, **extra).layer_maps

    def one_word():
        return run(per_word[:1])

    def batched():
        return run(per_word)

    def loop():
        return torch.cat([run([t]) for t in per_word])

    one_word()  # warm-up
    t_one, _ = timed(one_word, repeats)
    t_batched, maps_batched = timed(batched, repeats)
    t_loop, maps_loop = timed(loop, repeats)
    difference = float((maps_batched - maps_loop).abs().max() / max(float(maps_loop.abs().max()), 1e-12))
    where = "the attention layers" if "attention" in options else f"layer {captioner.default_layer}"
    print(f"\n{name}: {method}, {len(per_word)} words, {where}, median of {repeats}")
    print(f"  one word's map         {t_one:8.2f} s")
    print(f"  all words, batched     {t_batched:8.2f} s   ({t_batched / t_one:.2f}x one word)")
    print(f"  all words, per-word loop {t_loop:6.2f} s   (batched is {t_loop / t_batched:.1f}x faster)")
    print(f"  max relative map difference batched vs loop: {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-blip", action="store_true")
    parser.add_argument("--method", default="gradcam", help="one method: a CAM method, attention-gradcam or relevance")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({card}), dtype {args.dtype}")
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((480, 640, 3)) * 255).astype("uint8"))
    print(f"{torch.get_num_threads()} threads")
    if not args.skip_blip:
        bench("BLIP-base-sized random BlipForConditionalGeneration (384 px)", blip_base_captioner(device, args.dtype), image, CAPTION,
              args.repeats, args.method)
    default = captioning.load("default", device=device, dtype=args.dtype)
    from mmgradcam.data.shapes import make_image

    pixels, _, _ = make_image(3, seed=11)
    caption = default.generate(Image.fromarray(pixels))
    bench("default captioner (128 px)", default, Image.fromarray(pixels), caption, args.repeats, args.method)


if __name__ == "__main__":
    main()
