"""The shapes world: a seeded generator of COCO-format captioning and VQA data with exact masks.

Images hold 1-4 colored shapes on a textured, noisy background; distractors share a shape or a
color with another object; objects vary in size and position and may overlap a little. Every
object's visible pixels are its instance mask (RLE), so word-level maps can be scored exactly.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
}
PLURALS = {shape: shape + "s" for shape in SHAPES}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZE_WORDS = ("small", "large")
SUPERSAMPLE = 4
SPLIT_SEED_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003}


@dataclass
class ShapeObject:
    shape: str
    color: str
    cx: float
    cy: float
    radius: float
    angle: float
    mask: np.ndarray | None = field(default=None, repr=False)  # visible pixels, (H, W) bool
    id: int = 0

    @property
    def size_word(self) -> str:
        return "small" if self.radius < 15 else "large"

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with circumradius r (a circle is a 48-gon)."""
    if shape == "circle":
        n, radii = 48, [r]
    elif shape == "square":
        n, radii, angle = 4, [r], angle + math.pi / 4
    elif shape == "diamond":
        n, radii, angle = 4, [r * 1.1, r * 0.7], 0.0  # a rhombus, taller than wide
        return [(cx, cy - r * 1.1), (cx + r * 0.7, cy), (cx, cy + r * 1.1), (cx - r * 0.7, cy)]
    elif shape == "triangle":
        n, radii, angle = 3, [r * 1.1], angle - math.pi / 2
    elif shape == "star":
        n, radii, angle = 10, [r * 1.15, r * 0.5], angle - math.pi / 2
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return [(cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
             cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n)) for i in range(n)]


def _coverage(obj: ShapeObject, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one object, rendered at SUPERSAMPLE x resolution."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    points = [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in
              shape_polygon(obj.shape, obj.cx, obj.cy, obj.radius, obj.angle)]
    ImageDraw.Draw(big).polygon(points, fill=255)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-contrast textured background: a tinted gradient, soft blobs and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(90, 170)
    tint = rng.uniform(-15, 15, size=3)
    gx, gy = rng.uniform(-40, 40, size=2)
    image = base + tint[None, None, :] + (gx * xx + gy * yy)[..., None]
    blobs = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(blobs)
    for _ in range(rng.integers(3, 9)):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, 30)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.integers(20, 60)))
    blobs = np.asarray(blobs.filter(ImageFilter.GaussianBlur(6)), dtype=np.float32)
    image = image + (blobs - blobs.mean())[..., None] * 0.6
    if rng.random() < 0.5:  # faint stripes
        period, phase = rng.uniform(6, 16), rng.uniform(0, 2 * np.pi)
        direction = xx if rng.random() < 0.5 else yy
        image = image + 8 * np.sin(2 * np.pi * direction * size / period + phase)[..., None]
    image = image + rng.normal(0, rng.uniform(4, 12), size=image.shape)
    return image


def _sample_objects(rng: random.Random, size: int, max_objects: int) -> list[ShapeObject]:
    count = rng.randint(1, max_objects)
    objects: list[ShapeObject] = []
    attempts = 0
    while len(objects) < count and attempts < 200:
        attempts += 1
        if objects and rng.random() < 0.4:  # a distractor sharing a shape or a color
            other = rng.choice(objects)
            if rng.random() < 0.5:
                shape, color = other.shape, rng.choice([c for c in COLORS if c != other.color])
            else:
                shape, color = rng.choice([s for s in SHAPES if s != other.shape]), other.color
        else:
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        radius = rng.uniform(10, 24) * size / 128
        margin = radius * 1.2
        cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
        # some overlap is allowed, but every object must stay mostly visible and distinct
        if any(math.hypot(cx - o.cx, cy - o.cy) < 0.75 * (radius + o.radius) for o in objects):
            continue
        if any(o.shape == shape and o.color == color and abs(o.radius - radius) < 1 for o in objects):
            continue
        # upright shapes with a little jitter: a square turned 45 degrees would be a diamond
        objects.append(ShapeObject(shape, color, cx, cy, radius, math.radians(rng.uniform(-12, 12))))
    return objects


def render(objects: list[ShapeObject], size: int, seed: int) -> np.ndarray:
    """Draw ``objects`` (later ones on top) and set each object's visible ``mask``; returns uint8 RGB."""
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    coverages = [_coverage(o, size) for o in objects]
    for obj, cover in zip(objects, coverages):
        color = np.array(COLORS[obj.color], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        shading = 1.0 + 0.12 * rng.standard_normal((size, size)).astype(np.float32)[..., None] * 0.3
        image = image * (1 - cover[..., None]) + (color * shading) * cover[..., None]
    image = image + rng.normal(0, 3, size=image.shape)
    on_top = np.zeros((size, size), dtype=bool)
    for obj, cover in reversed(list(zip(objects, coverages))):
        drawn = cover >= 0.5
        obj.mask = drawn & ~on_top
        on_top |= drawn
    return np.clip(image, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- captions
def _position_word(obj: ShapeObject, size: int) -> str:
    vertical = "top" if obj.cy < size / 3 else "bottom" if obj.cy > 2 * size / 3 else ""
    horizontal = "left" if obj.cx < size / 3 else "right" if obj.cx > 2 * size / 3 else ""
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    return vertical or horizontal or "center"


def _group_phrases(objects: list[ShapeObject], with_size: bool) -> list[str]:
    """Noun phrases naming every object once, identical (color, shape) grouped: 'two red circles'."""
    counts = Counter((o.color, o.shape) for o in objects)
    phrases, seen = [], set()
    for obj in sorted(objects, key=lambda o: o.cx):
        key = (obj.color, obj.shape)
        if key in seen:
            continue
        seen.add(key)
        n = counts[key]
        if n == 1:
            size_word = f"{obj.size_word} " if with_size else ""
            phrases.append(f"a {size_word}{obj.color} {obj.shape}")
        else:
            phrases.append(f"{NUMBER_WORDS[n]} {obj.color} {PLURALS[obj.shape]}")
    return phrases


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def captions_for(objects: list[ShapeObject], size: int, rng: random.Random, count: int = 5) -> list[str]:
    """``count`` distinct captions, each naming every object's color and shape."""
    phrases = _group_phrases(objects, False)
    options = {
        _join(phrases),
        _join(_group_phrases(objects, True)),
        ("there is " if phrases[0].startswith("a ") else "there are ") + _join(phrases),
    }
    if len(objects) == 1:
        obj = objects[0]
        options.add(f"a {obj.color} {obj.shape} in the {_position_word(obj, size)}")
        options.add(f"a {obj.size_word} {obj.color} {obj.shape} in the {_position_word(obj, size)}")
    if len(objects) == 2 and (objects[0].color, objects[0].shape) != (objects[1].color, objects[1].shape):
        a, b = sorted(objects, key=lambda o: o.cx)
        options.add(f"a {a.name} {_relation(a, b)} a {b.name}")
        options.add(f"a {b.name} {_relation(b, a)} a {a.name}")
        options.add(f"a {a.size_word} {a.name} {_relation(a, b)} a {b.size_word} {b.name}")
    options = sorted(options)
    rng.shuffle(options)
    while len(options) < count:
        options.append(options[len(options) % max(1, len(set(options)))])
    return options[:count]


# ----------------------------------------------------------------------------- questions
def questions_for(objects: list[ShapeObject], rng: random.Random) -> list[dict]:
    """VQA questions with answers and the ids of the objects each question refers to."""
    questions = []
    counts = Counter(o.shape for o in objects)
    # what color is the <shape>?  (only when the shape is unique)
    unique_shapes = [o for o in objects if counts[o.shape] == 1]
    if unique_shapes:
        o = rng.choice(unique_shapes)
        questions.append({"question": f"what color is the {o.shape} ?", "answer": o.color,
                          "type": "color", "object_ids": [o.id]})
    # what shape is the <color> object?
    color_counts = Counter(o.color for o in objects)
    unique_colors = [o for o in objects if color_counts[o.color] == 1]
    if unique_colors:
        o = rng.choice(unique_colors)
        questions.append({"question": f"what shape is the {o.color} object ?", "answer": o.shape,
                          "type": "shape", "object_ids": [o.id]})
    # how many <shape>s are there?
    shape = rng.choice(list(counts) if rng.random() < 0.7 else list(SHAPES))
    questions.append({"question": f"how many {PLURALS[shape]} are there ?",
                      "answer": NUMBER_WORDS.get(counts[shape], "zero"), "type": "count",
                      "object_ids": [o.id for o in objects if o.shape == shape]})
    # is there a <color> <shape>?
    if rng.random() < 0.5:
        o = rng.choice(objects)
        color, shape, answer, ids = o.color, o.shape, "yes", [o.id]
    else:
        present = {(o.color, o.shape) for o in objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        # hard negatives: share the shape or the color of an object in the image
        hard = [(c, s) for c, s in absent if any(o.color == c or o.shape == s for o in objects)]
        color, shape = rng.choice(hard or absent)
        answer, ids = "no", []
    questions.append({"question": f"is there a {color} {shape} ?", "answer": answer,
                      "type": "exist", "object_ids": ids})
    # what shape is left of / above the <color shape>?
    if len(objects) >= 2:
        unique = [o for o in objects if sum(1 for p in objects if (p.color, p.shape) == (o.color, o.shape)) == 1]
        if unique:
            anchor = rng.choice(unique)
            relation, test = rng.choice([
                ("left of", lambda o: o.cx < anchor.cx - 4), ("right of", lambda o: o.cx > anchor.cx + 4),
                ("above", lambda o: o.cy < anchor.cy - 4), ("below", lambda o: o.cy > anchor.cy + 4),
            ])
            matches = [o for o in objects if o is not anchor and test(o)]
            if len(matches) == 1:
                questions.append({"question": f"what shape is {relation} the {anchor.name} ?",
                                  "answer": matches[0].shape, "type": "relation",
                                  "object_ids": [matches[0].id]})
    return questions


# ----------------------------------------------------------------------------- COCO files
def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def categories() -> list[dict]:
    return [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]


def make_image(index: int, seed: int, size: int = 128, max_objects: int = 4,
               bias: dict[str, str] | None = None) -> tuple[np.ndarray, list[ShapeObject], random.Random]:
    """One image and its objects, determined by (seed, index) alone."""
    rng = random.Random(f"{seed}:{index}")
    objects = _sample_objects(rng, size, max_objects)
    if bias:  # a confounded split: e.g. every circle is red
        for obj in objects:
            if obj.shape in bias:
                obj.color = bias[obj.shape]
    image = render(objects, size, seed=rng.randrange(2**32))
    return image, objects, rng


def write_split(out: Path, split: str, num_images: int, seed: int = 0, size: int = 128, max_objects: int = 4,
                captions_per_image: int = 5, bias: dict[str, str] | None = None, image_format: str = "png",
                progress: bool = False) -> dict[str, Path]:
    """Write ``out/<split>/*.png`` and the COCO / VQA json files for one split; returns their paths."""
    out = Path(out)
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    split_seed = seed + SPLIT_SEED_OFFSETS.get(split, sum(map(ord, split)) * 7919)
    images, annotations, captions, questions, answers = [], [], [], [], []
    ann_id, question_id = 1, 1
    category_ids = {c["name"]: c["id"] for c in categories()}
    indices = range(num_images)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"shapes {split}", unit="img")
    for index in indices:
        image_id = index + 1
        pixels, objects, rng = make_image(index, split_seed, size, max_objects, bias)
        file_name = f"{split}_{image_id:06d}.{image_format}"
        Image.fromarray(pixels).save(image_dir / file_name, quality=95) if image_format == "jpg" \
            else Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            obj.id = ann_id
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": category_ids[obj.shape],
                "segmentation": _rle(obj.mask), "area": float(obj.mask.sum()), "bbox": _bbox(obj.mask),
                "iscrowd": 0, "attributes": {"color": obj.color, "size": obj.size_word},
            })
            ann_id += 1
        for caption in captions_for(objects, size, rng, captions_per_image):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption})
        for q in questions_for(objects, rng):
            questions.append({"question_id": question_id, "image_id": image_id, "question": q["question"]})
            answers.append({
                "question_id": question_id, "image_id": image_id, "question_type": q["type"],
                "answer_type": "number" if q["type"] == "count" else "yes/no" if q["type"] == "exist" else "other",
                "multiple_choice_answer": q["answer"],
                "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": 1}],
                "object_ids": q["object_ids"],
            })
            question_id += 1
    info = {"description": "mmgradcam shapes world", "seed": seed, "split": split, "bias": bias or {}}
    paths = {
        "instances": out / f"instances_{split}.json",
        "captions": out / f"captions_{split}.json",
        "questions": out / f"questions_{split}.json",
        "answers": out / f"answers_{split}.json",
        "images": image_dir,
    }
    base = {"info": info, "images": images, "licenses": []}
    _dump(paths["instances"], {**base, "annotations": annotations, "categories": categories()})
    _dump(paths["captions"], {**base, "annotations": captions})
    _dump(paths["questions"], {"info": info, "data_subtype": split, "questions": questions})
    _dump(paths["answers"], {"info": info, "data_subtype": split, "annotations": answers})
    return paths


def _dump(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


# ----------------------------------------------------------------------------- reading back
def read_split(data_dir: str | Path, split: str) -> dict:
    """The COCO / VQA json of a split as dicts, plus the image directory."""
    data_dir = Path(data_dir)
    out = {"images_dir": data_dir / split}
    for kind in ("instances", "captions", "questions", "answers"):
        path = data_dir / f"{kind}_{split}.json"
        out[kind] = json.loads(path.read_text()) if path.is_file() else None
    if out["instances"] is None:
        raise FileNotFoundError(f"no instances_{split}.json in {str(data_dir)!r}; write it with "
                                f"`mmgradcam make-shapes --out {data_dir} --split {split}`")
    return out


def image_objects(instances: dict) -> dict[int, list[tuple[str, str]]]:
    """image id -> [(color, shape), ...] from a shapes-world instances file."""
    names = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, list[tuple[str, str]]] = {img["id"]: [] for img in instances["images"]}
    for ann in instances["annotations"]:
        objects[ann["image_id"]].append((ann["attributes"]["color"], names[ann["category_id"]]))
    return objects


def ensure_split(data_dir: str | Path, split: str, num_images: int, seed: int = 0, **kwargs) -> Path:
    """Write the split unless a complete one with the same seed and size is already there."""
    data_dir = Path(data_dir)
    path = data_dir / f"instances_{split}.json"
    if path.is_file():
        info = json.loads(path.read_text())
        if info["info"].get("seed") == seed and len(info["images"]) == num_images \
                and info["info"].get("bias", {}) == (kwargs.get("bias") or {}):
            return data_dir
    write_split(data_dir, split, num_images, seed=seed, progress=True, **kwargs)
    return data_dir
