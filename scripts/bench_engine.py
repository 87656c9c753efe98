"""One batched explain against T separate forward+backward passes, side by side in one run.

    python scripts/bench_engine.py                 # ResNet-50 at 224 px, T = 1, 8, 32
    python scripts/bench_engine.py --model resnet18 --size 128 --targets 1 4 --repeats 1

Both sides produce the same maps (checked); only time is compared. The separate side is what
a one-target-per-pass tool does: forward the image, backprop one target, repeat.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import mmgradcam as mg
from mmgradcam.targets import ClassScore


def separate_passes(model, image, targets, layer):
    maps = []
    for target in targets:
        maps.append(mg.explain(model, image, [target], layer, batched=False).layer_maps)
    return torch.cat(maps)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    image = torch.randn(args.batch, 3, args.size, args.size)
    print(f"{args.model} at {args.size} px, batch {args.batch}, layer {args.layer}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'T':>4} {'batched explain (s)':>20} {'T separate passes (s)':>22} {'speed-up':>9}")
    mg.explain(model, image, [ClassScore(0)], args.layer)  # warm-up
    for count in args.targets:
        targets = [ClassScore(k) for k in range(count)]
        batched_time, batched = timed(lambda: mg.explain(model, image, targets, args.layer).layer_maps, args.repeats)
        separate_time, separate = timed(lambda: separate_passes(model, image, targets, args.layer), args.repeats)
        torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)
        print(f"{count:>4} {batched_time:>20.3f} {separate_time:>22.3f} {separate_time / batched_time:>8.1f}x")


if __name__ == "__main__":
    main()
