"""Reading COCO-format files for scoring: validated, with bad entries reported and skipped."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Skip:
    kind: str  # "image", "annotation", "question"
    id: int | str | None
    reason: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "id": self.id, "reason": self.reason}

    def as_line(self, batch: int) -> dict:
        """A results-file line recording the skip."""
        return {"kind": "skip", "batch": batch, "item": self.kind, "id": self.id, "reason": self.reason}


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what}: {str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {str(path)!r} holds a {type(data).__name__}, expected a JSON object")
    return data


def _require(data: dict, keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{what} lacks the key(s) {missing}; a COCO file needs {keys}")


def safe_image_path(images_dir: Path, file_name: object) -> Path | None:
    """The image's path inside ``images_dir``, or None when ``file_name`` would escape it."""
    if not isinstance(file_name, str) or not file_name or Path(file_name).is_absolute() or "\x00" in file_name:
        return None
    root = images_dir.resolve()
    path = (root / file_name).resolve()
    if path != root and root not in path.parents:
        return None
    return path


@dataclass
class CocoData:
    """Images, per-image annotations and captions of a COCO-format data set, with what was skipped."""

    images: dict[int, dict]
    annotations: dict[int, list[dict]]
    categories: dict[int, str]
    captions: dict[int, list[str]]
    images_dir: Path
    skipped: list[Skip] = field(default_factory=list)
    colors: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, instances: str | Path, images_dir: str | Path, captions: str | Path | None = None) -> "CocoData":
        data = read_json(instances, "--instances")
        _require(data, ["images", "annotations", "categories"], f"--instances {str(instances)!r}")
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise FileNotFoundError(f"--images: no such directory {str(images_dir)!r}")
        skipped: list[Skip] = []
        images: dict[int, dict] = {}
        for image in data["images"]:
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                skipped.append(Skip("image", image.get("id") if isinstance(image, dict) else None,
                                    "image entry lacks 'id' or 'file_name'"))
                continue
            if image["id"] in images:
                skipped.append(Skip("image", image["id"], "duplicate image id (first entry kept)"))
                continue
            path = safe_image_path(images_dir, image["file_name"])
            if path is None:
                skipped.append(Skip("image", image["id"], f"file_name {image['file_name']!r} escapes the image directory"))
                continue
            images[image["id"]] = {**image, "path": path}
        categories = {c["id"]: c["name"] for c in data["categories"] if "id" in c and "name" in c}
        annotations: dict[int, list[dict]] = defaultdict(list)
        seen_ids = set()
        colors = set()
        for ann in data["annotations"]:
            ann_id = ann.get("id")
            if ann_id in seen_ids:
                skipped.append(Skip("annotation", ann_id, "duplicate annotation id (first kept)"))
                continue
            seen_ids.add(ann_id)
            if ann.get("image_id") not in images:
                skipped.append(Skip("annotation", ann_id, f"refers to unknown image {ann.get('image_id')!r}"))
                continue
            if ann.get("category_id") not in categories:
                skipped.append(Skip("annotation", ann_id, f"unknown category {ann.get('category_id')!r}"))
                continue
            if "segmentation" not in ann:
                skipped.append(Skip("annotation", ann_id, "no segmentation"))
                continue
            color = (ann.get("attributes") or {}).get("color")
            if color:
                colors.add(color)
            annotations[ann["image_id"]].append(ann)
        caption_table: dict[int, list[str]] = defaultdict(list)
        if captions is not None:
            caption_data = read_json(captions, "--captions")
            _require(caption_data, ["annotations"], f"--captions {str(captions)!r}")
            for ann in caption_data["annotations"]:
                if ann.get("image_id") in images and isinstance(ann.get("caption"), str):
                    caption_table[ann["image_id"]].append(ann["caption"])
        return cls(images, dict(annotations), categories, dict(caption_table), images_dir, skipped, colors)

    def mask_of(self, ann: dict, height: int, width: int) -> np.ndarray | None:
        """The annotation's mask (polygons, RLE or crowd RLE), None when it is empty or unreadable."""
        from pycocotools import mask as mask_utils

        segmentation = ann["segmentation"]
        try:
            if isinstance(segmentation, list):
                polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
                if not polygons:
                    return None
                rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
            elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = dict(segmentation)
                if isinstance(rle.get("counts"), str):
                    rle["counts"] = rle["counts"].encode("ascii")
            mask = mask_utils.decode(rle).astype(bool)
        except Exception:  # pycocotools raises bare exceptions for malformed input
            return None
        if mask.ndim == 3:
            mask = mask.any(axis=2)
        if mask.shape != (height, width) or not mask.any():
            return None
        return mask

    def annotation_masks(self, image_id: int, height: int, width: int) -> list[tuple[dict, np.ndarray | None]]:
        """Every annotation of the image with its mask (None: empty or unreadable), each decoded
        once: the category, color, all-objects and question masks are unions of these."""
        return [(ann, self.mask_of(ann, height, width)) for ann in self.annotations.get(image_id, [])]

    def target_masks(self, image_id: int, height: int, width: int,
                     decoded: list[tuple[dict, np.ndarray | None]] | None = None,
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Skip]]:
        """Union masks per category name and per color for one image, and the skipped annotations
        (``decoded``: ``annotation_masks``' output, to reuse masks decoded already)."""
        by_category: dict[str, np.ndarray] = {}
        by_color: dict[str, np.ndarray] = {}
        skipped = []
        for ann, mask in decoded if decoded is not None else self.annotation_masks(image_id, height, width):
            if mask is None:
                skipped.append(Skip("annotation", ann.get("id"), "empty (zero-area) or unreadable mask"))
                continue
            name = self.categories[ann["category_id"]]
            by_category[name] = by_category.get(name, np.zeros_like(mask)) | mask
            color = (ann.get("attributes") or {}).get("color")
            if color:
                by_color[color] = by_color.get(color, np.zeros_like(mask)) | mask
        return by_category, by_color, skipped

    def object_mask(self, ids: list[int], image_id: int, height: int, width: int,
                    decoded: list[tuple[dict, np.ndarray | None]] | None = None) -> np.ndarray | None:
        """The union of the masks of annotations ``ids`` of one image (None when none is usable)."""
        wanted = set(ids)
        if decoded is None:
            decoded = [(a, self.mask_of(a, height, width)) for a in self.annotations.get(image_id, [])
                       if a.get("id") in wanted]
        masks = [m for a, m in decoded if a.get("id") in wanted and m is not None]
        return np.any(masks, axis=0) if masks else None
