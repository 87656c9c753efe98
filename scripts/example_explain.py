"""Explain a torchvision ResNet-18 with every CAM method and save the maps as a PNG.

    python scripts/example_explain.py --out out/example

The network has random weights (nothing can be downloaded here), so the maps show the engine
at work, not what a trained classifier sees; `mmgradcam caption` explains the trained default.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

import mmgradcam as mg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/example"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    image = torch.zeros(1, 3, 128, 128)
    image[:, 0, 30:70, 20:60] = 1.0  # a red square
    image[:, 2, 80:110, 70:110] = 1.0  # a blue rectangle
    targets = [mg.targets.ClassScore(k) for k in range(3)]
    args.out.mkdir(parents=True, exist_ok=True)
    methods = mg.available_methods()
    fig, axes = plt.subplots(len(targets), len(methods) + 1, figsize=(2.2 * (len(methods) + 1), 2.2 * len(targets)))
    for col, method in enumerate(methods):
        maps = mg.explain(model, image, targets, "layer3", method).normalized()  # (T, 1, 128, 128)
        for row in range(len(targets)):
            axes[row, 0].imshow(image[0].permute(1, 2, 0))
            axes[row, 0].set_title(f"class {row}")
            axes[row, col + 1].imshow(image[0].permute(1, 2, 0))
            axes[row, col + 1].imshow(maps[row, 0], cmap="jet", alpha=0.5)
            axes[row, col + 1].set_title(method)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out / "methods.png", dpi=80)
    print(f"wrote {args.out / 'methods.png'}")


if __name__ == "__main__":
    main()
