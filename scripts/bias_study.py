"""Dataset bias, measured: where does a captioner trained with every circle red look for "circle"?

    python scripts/bias_study.py --data data/shapes --split test --biased runs/captioner-bias/model \
        --limit 300 --out runs/bias-study

On an UNBIASED split, for both the shipped captioner and the biased one, over images that hold a
circle that is not red and at least one red object that is not a circle:
- how often the model's own caption names the (non-red) circle at all;
- for a reference caption that names the circle (teacher-forced, the same words for both models),
  the share of the "circle" map's mass on the circle(s) and on the red non-circle objects, and
  whether the map's maximum lies on a circle or on a red non-circle object.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mmgradcam.data.shapes import read_split
from mmgradcam.tasks import captioning


def cases(split: dict, limit: int) -> list[dict]:
    """Images with a non-red circle and a red non-circle object, with their masks and a reference
    caption naming the circle."""
    names = {c["id"]: c["name"] for c in split["instances"]["categories"]}
    objects: dict[int, list[tuple[str, str, np.ndarray]]] = {}
    for ann in split["instances"]["annotations"]:
        color = ann["attributes"]["color"]
        objects.setdefault(ann["image_id"], []).append(
            (names[ann["category_id"]], color, mask_utils.decode(ann["segmentation"]).astype(bool)))
    references: dict[int, list[str]] = {}
    for ann in split["captions"]["annotations"]:
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    found = []
    for info in split["instances"]["images"]:
        held = objects.get(info["id"], [])
        circles = [m for shape, color, m in held if shape == "circle" and color != "red"]
        red_others = [m for shape, color, m in held if shape != "circle" and color == "red"]
        caption = next((c for c in references.get(info["id"], []) if "circle" in c.split()), None)
        if circles and red_others and caption:
            found.append({"file": split["images_dir"] / info["file_name"], "caption": caption,
                          "circle": np.any(circles, axis=0), "red": np.any(red_others, axis=0)})
        if len(found) == limit:
            break
    return found


def measure(captioner, found: list[dict], method: str, layer: str) -> dict:
    named, on_circle, on_red, peak_circle, peak_red = 0, [], [], 0, 0
    for case in found:
        image = Image.open(case["file"]).convert("RGB")
        named += "circle" in captioner.generate(image).split()
        result = captioner.explain(image, case["caption"], method=method, layer=layer)
        j = result.words.index("circle")
        heat = result.maps[j].numpy()
        total = float(heat.sum()) or 1.0
        on_circle.append(float(heat[case["circle"]].sum()) / total)
        on_red.append(float(heat[case["red"]].sum()) / total)
        y, x = np.unravel_index(int(heat.argmax()), heat.shape)
        peak_circle += bool(case["circle"][y, x])
        peak_red += bool(case["red"][y, x])
    n = len(found)
    return {"images": n, "caption_names_the_circle": named / n, "circle_map_mass_on_circles": float(np.mean(on_circle)),
            "circle_map_mass_on_red_non_circles": float(np.mean(on_red)), "peak_on_circle": peak_circle / n,
            "peak_on_red_non_circle": peak_red / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--baseline", default="default", help="the unbiased captioner")
    parser.add_argument("--biased", required=True, help="the captioner trained on the biased split")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="write bias_study.json here")
    # one method and layer for both models (each model's own defaults could differ and confound the study)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--layer", default="encoder.layer2")
    args = parser.parse_args()
    found = cases(read_split(args.data, args.split), args.limit)
    if not found:
        raise SystemExit(f"no image in {args.data}/{args.split} holds a non-red circle and a red non-circle")
    report = {"split": f"{args.data}/{args.split}", "method": args.method, "layer": args.layer,
              "baseline": {"model": args.baseline, **measure(captioning.load(args.baseline), found, args.method, args.layer)},
              "biased": {"model": args.biased, **measure(captioning.load(args.biased), found, args.method, args.layer)}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bias_study.json").write_text(text)


if __name__ == "__main__":
    main()
