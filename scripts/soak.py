"""Soak: explain many images with the default captioner and many VQA questions; print RSS.

    python scripts/soak.py                       # 1000 images + 1000 questions, RSS every 100
    python scripts/soak.py --images 120 --questions 120 --every 20 --warmup 40   # CI's short variant

Memory must stay flat: hooks, graphs and results are released after every call. The run fails
(exit 1) when RSS grows by 5% or more after the warm-up.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from PIL import Image

from mmgradcam.data.shapes import make_image
from mmgradcam.tasks import captioning, vqa


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200, help="calls before the reference RSS is taken")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    captioner, answerer = captioning.load("default"), vqa.load("default")
    images = [Image.fromarray(make_image(i, seed=404)[0]) for i in range(16)]  # reused: only the model's memory moves
    questions = ["what color is the circle ?", "how many stars are there ?", "is there a red square ?",
                 "what shape is the blue object ?"]
    readings, reference = [], None
    total = args.images + args.questions
    for n in range(1, total + 1):
        image = images[n % len(images)]
        if n <= args.images:
            captioner.explain(image)
        else:
            answerer.explain(image, questions[n % len(questions)])
        if n == args.warmup:
            gc.collect()
            reference = rss_mb()
        if n % args.every == 0:
            gc.collect()
            readings.append({"calls": n, "rss_mb": round(rss_mb(), 1)})
            print(f"{n:6d} calls  RSS {readings[-1]['rss_mb']:8.1f} MB", flush=True)
    after = [r["rss_mb"] for r in readings if r["calls"] > args.warmup]
    growth = (max(after) - reference) / reference if after and reference else 0.0
    report = {"readings": readings, "reference_mb": reference, "growth_after_warmup": growth}
    print(f"growth after warm-up: {100 * growth:.2f}%")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if growth < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
