"""A quick localization check of the shipped default models on a shapes-world split.

    python scripts/quick_pointing.py --data data/shapes --split test --limit 200

Captioner: for every shape noun in the generated caption, is the word map's maximum inside the
union mask of the image's objects of that shape? VQA: for every question that refers to objects,
is the map of the model's answer maximal inside their union mask? (The full scoring pipeline, with
baselines and confidence intervals, is `mmgradcam eval`.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mmgradcam.data.shapes import PLURALS, read_split
from mmgradcam.tasks import captioning, vqa

SINGULAR = {p: s for s, p in PLURALS.items()} | {s: s for s in PLURALS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--method", default="gradcam")
    args = parser.parse_args()
    split = read_split(args.data, args.split)
    names = {c["id"]: c["name"] for c in split["instances"]["categories"]}
    masks, shapes_of = {}, {}
    for ann in split["instances"]["annotations"]:
        masks[ann["id"]] = mask_utils.decode(ann["segmentation"]).astype(bool)
        shapes_of.setdefault(ann["image_id"], []).append((names[ann["category_id"]], ann["id"]))
    images = split["instances"]["images"][:args.limit]
    captioner, answerer = captioning.load("default"), vqa.load("default")

    caption_hits, caption_words = 0, 0
    for info in images:
        image = Image.open(split["images_dir"] / info["file_name"]).convert("RGB")
        result = captioner.explain(image, method=args.method)
        for j, word in enumerate(result.words):
            shape = SINGULAR.get(word)
            ids = [i for s, i in shapes_of.get(info["id"], []) if s == shape]
            if not ids:
                continue
            union = np.any([masks[i] for i in ids], axis=0)
            y, x = divmod(int(result.maps[j].argmax()), result.maps.shape[2])
            caption_hits += bool(union[y, x])
            caption_words += 1

    image_ids = {info["id"] for info in images}
    files = {info["id"]: info["file_name"] for info in images}
    answers = {a["question_id"]: a for a in split["answers"]["annotations"]}
    vqa_hits, vqa_count, per_type = 0, 0, {}
    for q in split["questions"]["questions"]:
        annotation = answers[q["question_id"]]
        if q["image_id"] not in image_ids or not annotation["object_ids"]:
            continue
        image = Image.open(split["images_dir"] / files[q["image_id"]]).convert("RGB")
        result = answerer.explain(image, q["question"], method=args.method)
        union = np.any([masks[i] for i in annotation["object_ids"]], axis=0)
        y, x = divmod(int(result.map.argmax()), result.map.shape[1])
        hit = bool(union[y, x])
        vqa_hits += hit
        vqa_count += 1
        kind = per_type.setdefault(annotation["question_type"], [0, 0])
        kind[0] += hit
        kind[1] += 1
    report = {
        "images": len(images), "method": args.method,
        "caption_shape_words": caption_words, "caption_pointing": caption_hits / max(caption_words, 1),
        "vqa_questions": vqa_count, "vqa_pointing": vqa_hits / max(vqa_count, 1),
        "vqa_pointing_per_type": {k: v[0] / v[1] for k, v in sorted(per_type.items())},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
