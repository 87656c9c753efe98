"""Calibrate the out-of-domain check (mmgradcam.tasks.shapes_world) on shapes-world images and on
the photographs that ship with scikit-image.

    python scripts/calibrate_domain.py --images 600

For each statistic it prints the worst value over the shapes-world val images in four forms a
user might pass (PNG, JPEG quality 75, resized to 300 px, padded to non-square), the false alarms,
and every scikit-image picture's statistics and verdict. The thresholds in shapes_world.py sit
between the two with a margin on each side.
"""
from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from mmgradcam.data.shapes import SPLIT_SEED_OFFSETS, make_image
from mmgradcam.tasks.shapes_world import (MAX_GRAY_EDGE_SHARE, MAX_OTHER_SHARE, MIN_PALETTE_SHARE, DomainCheck,
                                          domain_check)

PHOTOS = ["astronaut", "chelsea", "coffee", "camera", "rocket", "coins", "moon", "clock", "grass", "gravel",
          "brick", "cell", "hubble_deep_field", "immunohistochemistry", "retina", "microaneurysms", "page", "text",
          "stereo_motorcycle", "colorwheel", "logo", "horse", "checkerboard", "binary_blobs"]


def _jpeg(pixels: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "png": lambda p: p,
    "jpeg q75": _jpeg,
    "300 px": lambda p: np.asarray(Image.fromarray(p).resize((300, 300), Image.Resampling.BICUBIC)),
    "non-square": lambda p: np.pad(p, ((0, 0), (24, 24), (0, 0)), mode="edge"),
}


def _row(check: DomainCheck) -> str:
    verdict = "shapes world" if check.in_domain else "NOTICE: " + "; ".join(check.reasons)
    return f"palette {check.palette:.4f}  other {check.other:.4f}  gray edges {check.gray_edge:.4f}  {verdict}"


def shapes_world(count: int) -> None:
    seed = SPLIT_SEED_OFFSETS["val"]
    images = [make_image(i, seed=seed)[0] for i in range(count)]
    print(f"shapes world: {count} val images (seed {seed}); thresholds palette >= {MIN_PALETTE_SHARE}, "
          f"other <= {MAX_OTHER_SHARE}, gray edges <= {MAX_GRAY_EDGE_SHARE}")
    for name, variant in VARIANTS.items():
        start = time.perf_counter()
        checks = [domain_check(variant(p)) for p in images]
        per_image = (time.perf_counter() - start) / count
        alarms = sum(not c.in_domain for c in checks)
        print(f"  {name:<10} min palette {min(c.palette for c in checks):.4f}  max other "
              f"{max(c.other for c in checks):.4f}  max gray edges {max(c.gray_edge for c in checks):.4f}  "
              f"false alarms {alarms}/{count}  ({per_image * 1000:.1f} ms per image)")


def photos() -> None:
    import skimage.data

    detected = 0
    print("scikit-image pictures:")
    for name in PHOTOS:
        picture = getattr(skimage.data, name)()
        picture = picture[0] if isinstance(picture, tuple) else picture
        check = domain_check(np.asarray(picture))
        detected += not check.in_domain
        shape = "x".join(map(str, picture.shape))
        print(f"  {name:<21} {shape:<12} {_row(check)}")
    print(f"  detected {detected}/{len(PHOTOS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="shapes-world val images to check")
    args = parser.parse_args()
    shapes_world(args.images)
    photos()


if __name__ == "__main__":
    main()
