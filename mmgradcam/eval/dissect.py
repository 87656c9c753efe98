"""Network Dissection for a layer, and textual explanations built on it.

Each channel of the explained layer is named by the concept whose masks its strongest
activations overlap best: the channel's upsampled activation is thresholded at a high quantile of
its values over the data set, and IoU with each concept's masks (categories; colors where the
annotations carry them) is accumulated over all images. A word's or answer's Grad-CAM weights
(alpha, the spatially averaged gradients) then say which named channels it rests on, and which
speak against it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmgradcam.engine.capture import ActivationCapture
from mmgradcam.engine.layers import resolve_layer
from mmgradcam.engine.layouts import Layout
from mmgradcam.engine.state import preserved_state

from .coco import CocoData

QUANTILE = 0.99


def _adapter_inputs(adapter, image) -> tuple[dict[str, torch.Tensor], object]:
    """Model inputs (and geometry) for an image with a placeholder text: only the image matters."""
    return adapter.prepare(image, "a" if hasattr(adapter, "tokenize") else "what")  # a captioner tokenizes


def layer_activations(adapter, images: Sequence, layer: str | None = None) -> tuple[list[np.ndarray], list]:
    """(C, h, w) activations of ``layer`` for each image, and each image's geometry."""
    name, module = resolve_layer(adapter.model, adapter.resolve_layer(layer))
    layout = adapter.layer_options.get("layout")
    if layout is None:
        layout = Layout("auto", adapter.layer_options.get("prefix_tokens"), adapter.layer_options.get("grid"))
    out, geometries = [], []
    for image in images:
        inputs, geometry = _adapter_inputs(adapter, image)
        geometries.append(geometry)
        with preserved_state(adapter.model), torch.no_grad(), adapter.forward_context(), \
                ActivationCapture([(name, module)]) as capture:
            adapter.model(**inputs)
            activation = capture.activation(name).detach()
        out.append(layout.resolve(activation).to_bchw(activation, 1)[0].float().numpy())
    return out, geometries


def dissect(adapter, data: CocoData, image_ids: Sequence[int], layer: str | None = None,
            quantile: float = QUANTILE) -> dict:
    """Best concept and its IoU for every channel of ``layer`` over the given images."""
    from mmgradcam.tasks.geometry import load_image

    images = [load_image(data.images[i]["path"]) for i in image_ids]
    activations, geometries = layer_activations(adapter, images, layer)
    channels = activations[0].shape[0]
    stacked = np.concatenate([a.reshape(channels, -1) for a in activations], axis=1)
    thresholds = np.quantile(stacked, quantile, axis=1)
    overlap: dict[str, np.ndarray] = {}
    mask_area: dict[str, float] = {}
    fired_total = np.zeros(channels)
    for image_id, image, activation, geometry in zip(image_ids, images, activations, geometries):
        by_category, by_color, _ = data.target_masks(image_id, image.height, image.width)
        upsampled = geometry.invert(F.interpolate(torch.from_numpy(activation)[None], size=tuple(geometry.input_size),
                                                  mode="bilinear", align_corners=False)[0]).numpy()
        fired = upsampled > thresholds[:, None, None]  # (C, H, W)
        fired_total += fired.reshape(channels, -1).sum(1)
        for concept, mask in {**by_category, **by_color}.items():
            overlap[concept] = overlap.get(concept, np.zeros(channels)) + (fired & mask[None]).reshape(channels, -1).sum(1)
            mask_area[concept] = mask_area.get(concept, 0.0) + float(mask.sum())
    names = sorted(overlap)
    if not names:
        raise ValueError("no concept masks in these images: nothing to name channels by")
    # IoU over the whole data set: union = fired + mask - overlap, summed over images
    iou = np.stack([overlap[n] / np.maximum(fired_total + mask_area[n] - overlap[n], 1) for n in names], axis=1)
    best = iou.argmax(axis=1)
    return {
        "layer": layer_name(adapter, layer), "images": len(image_ids), "quantile": quantile, "concepts": names,
        "channels": [{"channel": c, "concept": names[best[c]], "iou": float(iou[c, best[c]])} for c in range(channels)],
    }


def layer_name(adapter, layer: str | None) -> str:
    return resolve_layer(adapter.model, adapter.resolve_layer(layer))[0]


def cache_path(cache_dir: Path, model_name: str, layer: str) -> Path:
    key = hashlib.sha256(f"{model_name}|{layer}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"dissection-{key}.json"


def load_or_dissect(adapter, data: CocoData, image_ids: Sequence[int], cache_dir: Path, layer: str | None = None) -> dict:
    """A cached dissection per (model, layer)."""
    path = cache_path(cache_dir, getattr(adapter, "name", "?"), layer_name(adapter, layer))
    if path.is_file():
        return json.loads(path.read_text())
    result = dissect(adapter, data, image_ids, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def textual_explanation(subject: str, alpha: np.ndarray, dissection: dict, top_k: int = 3,
                        min_iou: float = 0.04) -> dict:
    """Top channels by Grad-CAM weight, for and against ``subject``, with their concepts.

    Channels whose best IoU is below ``min_iou`` are unnamed and skipped."""
    named = {c["channel"]: c for c in dissection["channels"] if c["iou"] >= min_iou}
    order = np.argsort(-alpha)
    positive = [{"channel": int(c), "weight": float(alpha[c]), **{k: named[c][k] for k in ("concept", "iou")}}
                for c in order if alpha[c] > 0 and int(c) in named][:top_k]
    negative = [{"channel": int(c), "weight": float(alpha[c]), **{k: named[c][k] for k in ("concept", "iou")}}
                for c in order[::-1] if alpha[c] < 0 and int(c) in named][:top_k]

    def listing(entries):
        return ", ".join(f"{e['concept']} (IoU {e['iou']:.2f})" for e in entries)

    sentence = f"'{subject}' rests on channels that detect {listing(positive) or 'no named concept'}"
    if negative:
        sentence += f", and against channels that detect {listing(negative)}"
    return {"subject": subject, "for": positive, "against": negative, "sentence": sentence + "."}


def cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmgradcam" / "dissect"


def default_concept_data(images: int = 200) -> tuple[CocoData, list[int]]:
    """A shapes-world split written once into the cache: the concepts the default models know."""
    from mmgradcam.data.shapes import write_split

    root = cache_dir() / f"shapes-{images}"
    if not (root / "instances_concepts.json").is_file():
        write_split(root, "concepts", images, seed=99)
    data = CocoData.load(root / "instances_concepts.json", root / "concepts")
    return data, sorted(data.images)


def explain_text(adapter, subjects: Sequence[str], alphas: torch.Tensor | None, layer: str | None = None,
                 instances: str | None = None, images_dir: str | None = None, limit: int = 200,
                 top_k: int = 3) -> list[dict]:
    """Textual explanations for each subject (word or answer) from its method's channel weights
    (a result's ``alphas``: Grad-CAM's mean gradient, or the method's own)."""
    if alphas is None:  # HiResCAM / LayerCAM weigh locations, not channels: nothing to name
        raise ValueError("textual explanations need a method with per-channel weights (as Grad-CAM's mean "
                         "gradient); this method weighs each location, so no channel weight names a concept")
    if instances:
        data = CocoData.load(instances, images_dir)
        ids = sorted(data.images)[:limit]
    else:
        data, ids = default_concept_data(limit)
    dissection = load_or_dissect(adapter, data, ids, cache_dir(), layer)
    return [textual_explanation(s, alphas[k].numpy(), dissection, top_k) for k, s in enumerate(subjects)]
