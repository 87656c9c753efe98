"""The demo's own localization check over many demo images: how often does a shape noun's map peak
inside an object of that shape?

    python scripts/demo_seeds.py                 # seeds 0-19, every CAM method, the shipped captioner
    python scripts/demo_seeds.py --model runs/captioner/model --seeds 40

Each seed is the image ``mmgradcam demo --seed N`` renders; its caption is generated and explained
once with every CAM method from one forward and backward pass, and each shape noun is checked
with the demo's check (mmgradcam.tasks.shapes_world.shape_word_peaks). The aim for the README
demo: over seeds 0-19, at least 90% of shape nouns' maps (default method) peak inside their object.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

from mmgradcam import available_methods
from mmgradcam.cli import build_parser
from mmgradcam.data.shapes import make_image
from mmgradcam.tasks import captioning
from mmgradcam.tasks.shapes_world import DEMO_SEED, WordPeak, shape_word_peaks


def demo_default_seed() -> int:
    """The seed ``mmgradcam demo`` uses when given none (the README's figure)."""
    return int(build_parser().parse_args(["demo"]).seed)


def check_seeds(captioner: captioning.Captioner, seeds: range, methods: list[str],
                size: int = 128) -> dict[int, tuple[str, dict[str, list[WordPeak]]]]:
    """seed -> (caption, method -> the demo check's result for every shape noun)."""
    results = {}
    for seed in seeds:
        pixels, objects, _ = make_image(seed, seed=DEMO_SEED, size=size)
        explained = captioner.explain(pixels, method=methods)
        results[seed] = (explained.caption, {m: shape_word_peaks(explained.words, explained.for_method(m).maps, objects)
                                             for m in methods})
    return results


def _share(hits: int, total: int) -> str:
    return f"{hits}/{total} = {100 * hits / total:.1f}%" if total else "0/0"


def report(results: dict[int, tuple[str, dict[str, list[WordPeak]]]], methods: list[str], default_seed: int) -> None:
    width = max(len(m) for m in methods) + 2
    print("seed  " + "".join(f"{m:>{width}}" for m in methods) + "  caption")
    inside: dict[str, int] = defaultdict(int)
    named: dict[str, int] = defaultdict(int)
    wrong = 0
    for seed, (caption, by_method) in results.items():
        cells = []
        for method in methods:
            peaks = by_method[method]
            inside[method] += sum(p.inside for p in peaks)
            named[method] += sum(p.named for p in peaks)
            cells.append(f"{sum(p.inside for p in peaks)}/{len(peaks)}")
        wrong += sum(not p.named for p in by_method[methods[0]])
        marker = "  <- the README demo" if seed == default_seed else ""
        print(f"{seed:4d}  " + "".join(f"{c:>{width}}" for c in cells) + f"  {caption}{marker}")
    nouns = sum(len(by_method[methods[0]]) for _, by_method in results.values())
    print(f"\n{nouns} shape nouns in {len(results)} captions; {wrong} name a shape the image does not have "
          "(caption errors: counted as misses below, left out in the second column)")
    print(f"{'method':<{width}}  {'peaks inside, all shape nouns':>30}  {'of the nouns naming an object':>30}")
    for method in methods:
        print(f"{method:<{width}}  {_share(inside[method], nouns):>30}  {_share(inside[method], named[method]):>30}")
    print(f"\nthe README demo (`mmgradcam demo`) uses seed {default_seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' or a default-family model directory")
    parser.add_argument("--seeds", type=int, default=20, help="check demo seeds 0..N-1")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    captioner = captioning.load(args.model)
    # the model's default method first (the demo figure's first row), then every other CAM method
    methods = list(dict.fromkeys([captioner.default_method, *available_methods()]))
    print(f"model {args.model}: default method {captioner.default_method}, layer {captioner.default_layer}")
    results = check_seeds(captioner, range(args.seeds), methods, args.size)
    report(results, methods, demo_default_seed())


if __name__ == "__main__":
    main()
