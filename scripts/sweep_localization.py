"""Where each (layer x method) of a default-family model points, per word class, on a split.

    python scripts/sweep_localization.py --data data/shapes --split val --limit 200
    python scripts/sweep_localization.py --captioner runs/captioner/model --vqa runs/vqa/model --json sweep.json

Captioner: the model's own greedy caption for each image; every shape noun ("circle", "stars")
and color word whose object is in the image is scored against the union mask of the image's
objects of that shape (color). VQA: every question that refers to objects and that the model
answers correctly, except "no" / "zero" answers, is scored with the map of its answer against the
union mask of the objects it refers to. All CAM methods come from one forward and one backward pass
per layer; the attention methods (attention-gradcam, relevance), which read no layer, are scored
once (layer "attention") for models that read the image through attention. Metrics: pointing at 0 px (the map's maximum inside the mask) and at 15 px (within 15 px
of it) and the share of the map's mass inside the mask, beside a center baseline. The default layer and method of a
shipped model are chosen from this table on the val split (README, "Measured defaults").
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

import mmgradcam as mg
from mmgradcam.data.shapes import COLORS, PLURALS, read_split
from mmgradcam.eval.metrics import TOLERANCE_PX, center_gaussian, energy_inside, pointing_hit
from mmgradcam.tasks import captioning, vqa
from mmgradcam.tasks.default import GridTokens

SINGULAR = {plural: shape for shape, plural in PLURALS.items()} | {shape: shape for shape in PLURALS}
REFUSED_ANSWERS = ("no", "zero", "0")


def candidate_layers(model: torch.nn.Module) -> list[str]:
    """Every residual block and stage of the trunk, then the spatial layers after it: the
    projection to grid tokens (captioners that attend over the grid) or the question-conditioned
    blocks (FiLM VQA)."""
    names = []
    for stage in model.encoder.stage_names:
        blocks = getattr(model.encoder, stage)
        names += [f"encoder.{stage}.{i}" for i in range(len(blocks) - 1)]
        names.append(f"encoder.{stage}")
    if isinstance(getattr(model, "grid_tokens", None), GridTokens):
        names.append("grid_tokens.project")
    if hasattr(model, "fusion") and isinstance(model.fusion, torch.nn.ModuleList):
        names += ["project"] + [f"fusion.{k}" for k in range(len(model.fusion))]
    return names


ATTENTION_ROW = "attention"


def attention_methods(adapter) -> list[str]:
    """The attention methods that apply to the model (none for FiLM VQA with a pooled readout)."""
    every = adapter.method_choice("all")
    return [m for m in every if m not in mg.available_methods()]


def passes(adapter, layers: list[str]) -> list[tuple[str, str, list[str]]]:
    """(row label, layer, methods) per explain call: every CAM method at each layer, then the
    attention methods once."""
    calls = [(layer, layer, mg.available_methods()) for layer in layers]
    if attention_methods(adapter):
        calls.append((ATTENTION_ROW, layers[0], attention_methods(adapter)))
    return calls


class Tally:
    """Per (layer, method, word class): pointing hits and energies, with the center baseline."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str], list[tuple[float, float, float]]] = defaultdict(list)

    def add(self, key: tuple[str, str, str], heatmap: np.ndarray, mask: np.ndarray, distance: np.ndarray) -> None:
        self.values[key].append((float(pointing_hit(heatmap, mask, 0, distance)),
                                 float(pointing_hit(heatmap, mask, TOLERANCE_PX, distance)),
                                 energy_inside(heatmap, mask)))

    def rows(self) -> list[dict]:
        rows = []
        for (layer, method, word_class), v in sorted(self.values.items()):
            p0, p15, energy = np.mean(v, axis=0)
            rows.append({"layer": layer, "method": method, "class": word_class, "n": len(v),
                         "pointing_0px": float(p0), "pointing_15px": float(p15), "energy": float(energy)})
        return rows


def masks_by_image(split: dict) -> tuple[dict[int, np.ndarray], dict[int, list[tuple[str, str, int]]]]:
    names = {c["id"]: c["name"] for c in split["instances"]["categories"]}
    masks, objects = {}, defaultdict(list)
    for ann in split["instances"]["annotations"]:
        masks[ann["id"]] = mask_utils.decode(ann["segmentation"]).astype(bool)
        objects[ann["image_id"]].append((names[ann["category_id"]], ann["attributes"]["color"], ann["id"]))
    return masks, objects


def word_mask(word: str, here: list[tuple[str, str, int]], masks) -> tuple[str, np.ndarray] | None:
    """(word class, union mask of the objects the word names) or None for other words."""
    if word in SINGULAR:
        ids, word_class = [i for s, _, i in here if s == SINGULAR[word]], "shape nouns"
    elif word in COLORS:
        ids, word_class = [i for _, c, i in here if c == word], "colors"
    else:
        return None
    return (word_class, np.any([masks[i] for i in ids], axis=0)) if ids else None


def sweep_captioner(name: str, split: dict, images: list[dict], masks, objects, layers: list[str] | None,
                    batch_size: int) -> Tally:
    captioner = captioning.load(name)
    layers = layers or candidate_layers(captioner.model)
    tally = Tally()
    for start in range(0, len(images), batch_size):
        infos = images[start:start + batch_size]
        pils = [Image.open(split["images_dir"] / info["file_name"]).convert("RGB") for info in infos]
        captions = captioner.generate_batch(pils)
        by_layer = {label: captioner.explain_batch(pils, captions, method=methods, layer=layer)
                    for label, layer, methods in passes(captioner, layers)}
        for b, info in enumerate(infos):
            for j, word in enumerate(by_layer[layers[0]][b].words):
                named = word_mask(word, objects[info["id"]], masks)
                if named is None:
                    continue
                word_class, mask = named
                distance = ndimage.distance_transform_edt(~mask)
                tally.add(("-", "center", word_class), center_gaussian(mask.shape), mask, distance)
                for layer, results in by_layer.items():
                    for method, (maps, _, _) in results[b].method_maps.items():
                        tally.add((layer, method, word_class), maps[j].numpy(), mask, distance)
        print(f"captioner: {start + len(infos)}/{len(images)} images", file=sys.stderr, flush=True)
    return tally


def sweep_vqa(name: str, split: dict, images: list[dict], masks, layers: list[str] | None,
              correct_only: bool = True) -> tuple[Tally, dict]:
    model = vqa.load(name)
    layers = layers or candidate_layers(model.model)
    keep = {info["id"]: info for info in images}
    answers = {a["question_id"]: a for a in split["answers"]["annotations"]}
    tally, accuracy = Tally(), {"correct": 0, "questions": 0}
    for number, question in enumerate(split["questions"]["questions"]):
        info = keep.get(question["image_id"])
        if info is None:
            continue
        annotation = answers[question["question_id"]]
        pil = Image.open(split["images_dir"] / info["file_name"]).convert("RGB")
        inputs, geometry = model.prepare(pil, question["question"])
        answer = model.ranked_answers(inputs, 1)[0][0]
        accuracy["questions"] += 1
        correct = answer == annotation["multiple_choice_answer"]
        accuracy["correct"] += correct
        if not ((correct or not correct_only) and annotation["object_ids"] and answer not in REFUSED_ANSWERS):
            continue
        mask = np.any([masks[i] for i in annotation["object_ids"]], axis=0)
        distance = ndimage.distance_transform_edt(~mask)
        classes = ("VQA answers", f"VQA {annotation['question_type']}")
        for word_class in classes:
            tally.add(("-", "center", word_class), center_gaussian(mask.shape), mask, distance)
        for label, layer, methods in passes(model, layers):
            result = model.explain_prepared(inputs, geometry, question["question"], answer, method=methods, layer=layer)
            for method, (maps, _, _) in result.method_maps.items():
                for word_class in classes:
                    tally.add((label, method, word_class), maps[0].numpy(), mask, distance)
        if number % 100 == 0:
            print(f"vqa: question {number}", file=sys.stderr, flush=True)
    accuracy["accuracy"] = accuracy["correct"] / max(accuracy["questions"], 1)
    return tally, accuracy


# the word classes a model's defaults are chosen on (the per-question-type rows are for reading)
SELECTION_CLASSES = {"captioner": ("shape nouns", "colors"), "vqa": ("VQA answers",)}


def selection_score(cells: dict[str, dict], classes: tuple[str, ...]) -> float:
    """Mean over the classes of (pointing at 0 px + pointing at 15 px + energy) / 3: a map must
    peak on the object itself (not on its edge's outside, as the demo checks), near it, and keep
    its mass there."""
    return float(np.mean([(cells[c]["pointing_0px"] + cells[c]["pointing_15px"] + cells[c]["energy"]) / 3
                          for c in classes]))


def choose(rows: list[dict], classes: tuple[str, ...]) -> tuple[str, str] | None:
    """The (layer, method) with the best selection score (None when nothing was scored); a default
    is a layer and a CAM method, so the attention methods' rows are shown beside, not chosen."""
    table = defaultdict(dict)
    for r in rows:
        if r["layer"] not in ("-", ATTENTION_ROW):
            table[(r["layer"], r["method"])][r["class"]] = r
    scored = {key: selection_score(cells, classes) for key, cells in table.items()
              if all(c in cells for c in classes)}
    return max(scored, key=scored.get) if scored else None


def markdown(rows: list[dict], selection: tuple[str, ...], chosen: tuple[str, str] | None = None) -> str:
    classes = sorted({r["class"] for r in rows}, key=lambda c: (c.startswith("VQA "), c))
    table = defaultdict(dict)
    for r in rows:
        table[(r["layer"], r["method"])][r["class"]] = r
    lines = ["| layer | method | " + " | ".join(f"{c}: pointing 0 / 15 px / energy" for c in classes) + " | selection score |",
             "|---|---|" + "---|" * (len(classes) + 1)]
    for (layer, method), cells in sorted(table.items(), key=lambda kv: (kv[0][0] == "-", kv[0])):
        mark = " **(chosen)**" if chosen == (layer, method) else ""
        values = [f"{100 * cells[c]['pointing_0px']:.1f} / {100 * cells[c]['pointing_15px']:.1f} / "
                  f"{100 * cells[c]['energy']:.1f}" if c in cells else "—" for c in classes]
        score = selection_score(cells, selection) if all(c in cells for c in selection) else float("nan")
        lines.append(f"| {layer} | {method}{mark} | " + " | ".join(values) + f" | {100 * score:.1f} |")
    counts = ", ".join(f"{c} {table[('-', 'center')][c]['n']}" for c in classes if c in table[("-", "center")])
    return "\n".join(lines) + f"\n\nwords / answers scored: {counts}"


def write_defaults(task: str, model_dir: str, chosen: tuple[str, str], args: argparse.Namespace) -> None:
    """Record the chosen defaults in the model's config.json (the adapters read them from there)."""
    from mmgradcam.tasks import checkpoints

    directory = Path(model_dir)
    if model_dir == "default":
        directory = checkpoints.packaged("captioner" if task == "captioner" else "vqa")
    path = directory / checkpoints.CONFIG
    config = json.loads(path.read_text())
    config["default_layer"], config["default_method"] = chosen
    config["default_reason"] = (f"chosen on the val split ({args.limit} images) by scripts/sweep_localization.py: "
                                "the best mean of (pointing at 0 px + pointing at 15 px + energy in the mask) / 3 over "
                                + " and ".join(SELECTION_CLASSES[task]))
    path.write_text(json.dumps(config, indent=1))
    print(f"wrote default_layer={chosen[0]!r} default_method={chosen[1]!r} into {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=200, help="images (questions of these images for VQA)")
    parser.add_argument("--captioner", default="default", help="model directory, 'default', or 'none'")
    parser.add_argument("--vqa", default="default", help="model directory, 'default', or 'none'")
    parser.add_argument("--layers", default=None, help="comma-separated layer names (default: every trunk block)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--vqa-answers", choices=["correct", "all"], default="correct",
                        help="score the maps of correct answers only (default) or of every answer")
    parser.add_argument("--write-defaults", action="store_true",
                        help="write the chosen layer and method into each swept model's config.json (val only)")
    args = parser.parse_args(argv)
    if args.write_defaults and args.split != "val":
        parser.error("--write-defaults chooses on the val split only")
    if args.split == "test":
        print("note: defaults are chosen on val; a test-split sweep is for reporting only", file=sys.stderr)
    split = read_split(args.data, args.split)
    images = split["instances"]["images"][:args.limit]
    masks, objects = masks_by_image(split)
    layers = args.layers.split(",") if args.layers else None
    report = {"split": args.split, "images": len(images), "methods": mg.available_methods()}
    for task, name in (("captioner", args.captioner), ("vqa", args.vqa)):
        if name == "none":
            continue
        if task == "captioner":
            tally, extra = sweep_captioner(name, split, images, masks, objects, layers, args.batch_size), {}
        else:
            tally, extra = sweep_vqa(name, split, images, masks, layers, correct_only=args.vqa_answers == "correct")
        rows = tally.rows()
        chosen = choose(rows, SELECTION_CLASSES[task])
        report[task] = {"model": name, "rows": rows, "chosen": list(chosen) if chosen else None, **extra}
        accuracy = f", accuracy {100 * extra['accuracy']:.1f}% of {extra['questions']} questions" if extra else ""
        print(f"## {task} {name} ({args.split}, {len(images)} images{accuracy})\n")
        print(markdown(rows, SELECTION_CLASSES[task], chosen) + "\n")
        if args.write_defaults and chosen:
            write_defaults(task, name, chosen, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
