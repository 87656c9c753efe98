"""Sanity and faithfulness checks of word maps.

- Model randomization (Adebayo et al.): re-initialize a copy of the model's weights from the top
  layer down, in cumulative stages, and report the Spearman rank correlation of each word's map
  with the trained model's. Maps that survive randomization explain the input, not the model.
- Deletion / insertion (Petsiuk et al.): remove (gray) or insert (into a blurred copy) pixels in
  the order of the map and follow the word's probability; the area under the curve is compared
  with a random pixel order. Lower deletion AUC and higher insertion AUC mean a faithful map.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter
from scipy.stats import spearmanr
from torch import nn

STAGES = (0.25, 0.5, 0.75, 1.0)


def _parameter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly, from the output end back to the input."""
    owners = [(name, m) for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return owners[::-1]


def _reinitialize(module: nn.Module, generator_seed: int) -> None:
    import torch

    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    else:
        with torch.no_grad():
            for param in module.parameters(recurse=False):
                param.normal_(0, 0.02)
    if hasattr(module, "reset_running_stats"):
        module.reset_running_stats()


def randomization_study(captioner, images: Sequence, method: str = "gradcam", layer=None, seed: int = 0) -> dict:
    """Spearman correlation of word maps before and after cascading weight randomization."""
    import torch

    trained = captioner.explain_batch(list(images), method=method, layer=layer)
    captions = [r.caption for r in trained]
    clone = copy.copy(captioner)
    clone.model = copy.deepcopy(captioner.model)
    modules = _parameter_modules(clone.model)
    torch.manual_seed(seed)
    stages, done = [], 0
    for fraction in STAGES:
        upto = max(1, round(fraction * len(modules)))
        for name, module in modules[done:upto]:
            _reinitialize(module, seed)
        done = upto
        randomized = clone.explain_batch(list(images), captions, method=method, layer=layer)
        rhos = []
        for before, after in zip(trained, randomized):
            for j in range(len(before.words)):
                a, b = before.layer_maps[j].flatten().numpy(), after.layer_maps[j].flatten().numpy()
                if a.std() > 0 and b.std() > 0:
                    rhos.append(float(spearmanr(a, b).statistic))
        stages.append({"randomized_fraction": fraction, "randomized_down_to": modules[upto - 1][0],
                       "words": len(rhos), "mean_spearman": float(np.mean(rhos)) if rhos else None,
                       "mean_abs_spearman": float(np.mean(np.abs(rhos))) if rhos else None})
    return {"images": len(images), "stages": stages}


def _curve_images(image: np.ndarray, start: np.ndarray, order: np.ndarray, steps: int) -> list[Image.Image]:
    """Images where the first k/steps of ``order``'s pixels come from ``image``, the rest from ``start``."""
    flat_image = image.reshape(-1, 3)
    frames = []
    for k in range(steps + 1):
        frame = start.reshape(-1, 3).copy()
        chosen = order[: int(round(k / steps * len(order)))]
        frame[chosen] = flat_image[chosen]
        frames.append(Image.fromarray(frame.reshape(image.shape)))
    return frames


def _auc(values: list[float]) -> float:
    """Trapezoid area under equally spaced values on [0, 1]."""
    v = np.asarray(values, dtype=np.float64)
    return float(((v[1:] + v[:-1]) / 2).sum() / (len(v) - 1))


def faithfulness_study(captioner, images: Sequence[Image.Image], method: str = "gradcam", layer=None,
                       steps: int = 10, seed: int = 0) -> dict:
    """Deletion and insertion AUCs of word probabilities, map order against random order."""
    rng = np.random.default_rng(seed)
    results = captioner.explain_batch(list(images), method=method, layer=layer)
    aucs = {(curve, order): [] for curve in ("deletion", "insertion") for order in ("map", "random")}
    for pil, result in zip(images, results):
        image = np.asarray(pil.convert("RGB"))
        gray = np.full_like(image, 128)
        blurred = np.asarray(pil.convert("RGB").filter(ImageFilter.GaussianBlur(8)))
        frames, owners = [], []
        for j in range(len(result.words)):
            by_map = np.argsort(-result.maps[j].numpy().reshape(-1), kind="stable")
            random_order = rng.permutation(by_map.size)
            for order_name, order in (("map", by_map), ("random", random_order)):
                # deletion: the image with the most important pixels grayed first
                frames += _curve_images(gray, image, order, steps)
                owners.append(("deletion", order_name, j))
                frames += _curve_images(image, blurred, order, steps)
                owners.append(("insertion", order_name, j))
        scores = captioner.score_batch(frames, [result.caption] * len(frames))
        for n, (curve, order_name, j) in enumerate(owners):
            probabilities = [float(np.exp(s[j])) for s in scores[n * (steps + 1):(n + 1) * (steps + 1)]]
            aucs[(curve, order_name)].append(_auc(probabilities))
    return {"images": len(images), "words": len(aucs[("deletion", "map")]), "steps": steps,
            **{f"{curve}_auc_{order}": float(np.mean(v)) for (curve, order), v in aucs.items()}}
