"""Greedy caption generation of the default captioner with and without the key/value cache.

    python scripts/bench_generate.py                    # 256 shapes images, batch 64, median of 3
    python scripts/bench_generate.py --images 64 --repeats 1

Both paths run in one process on the same images (the encoder forward included in both); their
token ids are checked equal before the timing is printed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from mmgradcam.data.shapes import make_image
from mmgradcam.tasks import captioning


def time_greedy(model, batches: list[torch.Tensor], bos_id: int, eos_id: int, use_cache: bool,
                repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Median seconds over ``repeats`` passes of greedy generation over all batches, and the ids."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        ids = [model.greedy(pixels, bos_id, eos_id, use_cache=use_cache) for pixels in batches]
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)

    captioner = captioning.load("default")
    model, vocab = captioner.model, captioner.vocab
    pixels = torch.cat([captioner.preprocess(Image.fromarray(make_image(i, args.seed)[0]))[0]["pixel_values"]
                        for i in range(args.images)])
    batches = list(pixels.split(args.batch))
    time_greedy(model, batches[:1], vocab.bos_id, vocab.eos_id, True, 1)  # warm-up (allocator, kernels)

    uncached, uncached_ids = time_greedy(model, batches, vocab.bos_id, vocab.eos_id, False, args.repeats)
    cached, cached_ids = time_greedy(model, batches, vocab.bos_id, vocab.eos_id, True, args.repeats)
    if not all(torch.equal(a, b) for a, b in zip(cached_ids, uncached_ids)):
        raise SystemExit("cached and uncached generation gave different token ids")
    steps = max(ids.shape[1] for ids in cached_ids)
    print(f"{args.images} images, batch {args.batch}, up to {steps} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"uncached: {uncached:.2f} s ({args.images / uncached:.0f} images/s)")
    print(f"cached:   {cached:.2f} s ({args.images / cached:.0f} images/s)")
    print(f"cached is {uncached / cached:.2f}x faster (same token ids)")


if __name__ == "__main__":
    main()
