"""The cost of k CAM methods from one forward and backward against one method, and against k
separate runs, side by side in one run (median of --repeats).

    python scripts/bench_methods.py                     # ResNet-50 at 224 px + the shipped default captioner
    python scripts/bench_methods.py --skip-resnet --repeats 5

(a) a torchvision ResNet-50 with random weights, 224 px, explaining ``layer4`` for 8 targets;
(b) the shipped default captioner (``captioning.load("default")``) explaining every word of the
caption it generates for a shapes-world image (whatever its weights and vocabulary are).
k = 1 (gradcam), 2 (gradcam, hirescam), all (every registered CAM method). "k separate runs" is
one explain call per method. The maps of the one-pass and separate paths are checked equal.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mmgradcam as mg


def interleaved(functions: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median time of each function, the functions taking turns within every repeat (so that a
    shared, busy CPU slows all of them alike); and each one's last result."""
    times: dict[str, list[float]] = {key: [] for key in functions}
    results = {}
    for _ in range(repeats):
        for key, fn in functions.items():
            start = time.perf_counter()
            results[key] = fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}, results


def method_sets() -> list[list[str]]:
    every = mg.available_methods()
    return [["gradcam"], ["gradcam", "hirescam"], every]


def bench(name: str, one_pass, separate, repeats: int) -> list[str]:
    """Rows of the table for one model: ``one_pass(methods) -> {name: maps}``, ``separate(method) -> maps``."""
    one_pass(["gradcam"])  # warm-up
    rows = []
    for methods in method_sets():
        times, results = interleaved({"one method": lambda: one_pass(["gradcam"]),
                                      "one pass": lambda: one_pass(methods),
                                      "separate": lambda: {m: separate(m) for m in methods}}, repeats)
        for method in methods:
            torch.testing.assert_close(results["one pass"][method], results["separate"][method], rtol=0, atol=1e-6)
        label = "all" if len(methods) == len(mg.available_methods()) and len(methods) > 2 else str(len(methods))
        rows.append(f"| {name} | {label} ({', '.join(methods)}) | {times['one pass']:.3f} s | "
                    f"{times['one method']:.3f} s | {times['one pass'] / times['one method']:.2f}× | "
                    f"{times['separate']:.3f} s | {times['separate'] / times['one pass']:.1f}× |")
    return rows


def resnet_rows(repeats: int) -> list[str]:
    import torchvision

    from mmgradcam.targets import ClassScore

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    image = torch.randn(1, 3, 224, 224)
    targets = [ClassScore(k) for k in range(8)]

    def one_pass(methods):
        return {m: e.layer_maps for m, e in mg.explain(model, image, targets, "layer4", method=methods).items()}

    def separate(method):
        return mg.explain(model, image, targets, "layer4", method=method).layer_maps

    return bench("ResNet-50 (random weights), 224 px, `layer4`, 8 targets", one_pass, separate, repeats)


def captioner_rows(repeats: int) -> list[str]:
    from PIL import Image

    from mmgradcam.data.shapes import make_image
    from mmgradcam.tasks import captioning

    captioner = captioning.load("default")
    image = Image.fromarray(make_image(8, seed=20_251_121)[0])
    caption = captioner.generate(image)

    def one_pass(methods):
        result = captioner.explain(image, caption, method=methods)
        return {m: result.method_maps[m][1] for m in methods}

    def separate(method):
        return captioner.explain(image, caption, method=method).layer_maps

    words = len(captioner.tokenize(caption).words)
    print(f"default captioner: layer {captioner.default_layer}, caption {caption!r} ({words} words)")
    return bench(f"default captioner, {words} words (+ the caption target)", one_pass, separate, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-captioner", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, median of {args.repeats} (the paths take turns in every repeat), "
          f"load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    rows = []
    if not args.skip_resnet:
        rows += resnet_rows(args.repeats)
    if not args.skip_captioner:
        rows += captioner_rows(args.repeats)
    print("\n| model | k methods | k from one pass | one method | one pass vs one method | k separate runs | "
          "separate vs one pass |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
