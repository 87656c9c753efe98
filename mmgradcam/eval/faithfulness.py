"""Sanity and faithfulness checks of word maps.

- Model randomization (Adebayo et al.): re-initialize a copy of the model's weights from the top
  layer down, in cumulative stages, and report the Spearman rank correlation of each word's map
  with the trained model's. Maps that survive randomization explain the input, not the model.
- Deletion / insertion (Petsiuk et al.): remove (gray) or insert (into a blurred copy) pixels in
  the order of the map and follow the word's probability; the area under the curve is compared
  with a random pixel order. Lower deletion AUC and higher insertion AUC mean a faithful map.
- Perturbation test for VQA (Chefer et al. 2021): gray the image's pixels in steps of 10%, from
  the most to the least relevant (positive) and from the least to the most (negative), and follow
  the probability of the explained answer; the areas under both curves (with a random order
  beside them). Lower positive AUC and higher negative AUC mean a faithful map. It is deletion's
  curve (``_curve_images``) in both orders, scored by the VQA model.

Both take one method or several ("gradcam,hirescam", a list, "all"; None: the model's default):
every explain call computes all of them from one forward and backward, and the results hold one
entry per method under "methods" (the top-level numbers repeat the first method's). A method is
FLAGGED when its maps keep their rank correlation with the trained model's maps after every
weight has been randomized: mean |Spearman| >= SANITY_THRESHOLD at the last stage (100%).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter
from scipy.stats import spearmanr
from torch import nn

STAGES = (0.25, 0.5, 0.75, 1.0)
# mean |Spearman rho| with the trained model's maps at 100% randomization from which a method's
# maps are said to ignore the weights (Adebayo et al. call such maps "edge detectors")
SANITY_THRESHOLD = 0.2


def _method_list(captioner, method) -> list[str]:
    from mmgradcam.engine.registry import method_names

    return method_names(captioner.default_method if method is None else method)


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


def randomization_study(captioner, images: Sequence, method=None, layer=None, seed: int = 0) -> dict:
    """Spearman correlation of word maps before and after cascading weight randomization, per
    method (one explain call per stage for all of them); ``flagged`` lists the methods whose maps
    survive full randomization (mean |rho| >= SANITY_THRESHOLD)."""
    import torch

    from mmgradcam.engine.registry import is_pixel_method

    names = _method_list(captioner, method)
    trained = captioner.explain_batch(list(images), method=names, layer=layer)
    captions = [r.caption for r in trained]
    clone = copy.copy(captioner)
    clone.model = copy.deepcopy(captioner.model)
    modules = _parameter_modules(clone.model)
    torch.manual_seed(seed)
    stages: dict[str, list[dict]] = {name: [] for name in names}
    done = 0
    for fraction in STAGES:
        upto = max(1, round(fraction * len(modules)))
        for _, module in modules[done:upto]:
            _reinitialize(module, seed)
        done = upto
        randomized = clone.explain_batch(list(images), captions, method=names, layer=layer)
        for name in names:
            rhos = []
            # the layer's maps, or a pixel-space method's own maps (its layer maps are Grad-CAM's)
            level = 0 if is_pixel_method(name) else 1
            for before, after in zip(trained, randomized):
                before_maps, after_maps = before.method_maps[name][level], after.method_maps[name][level]
                for j in range(len(before.words)):
                    a, b = before_maps[j].flatten().numpy(), after_maps[j].flatten().numpy()
                    if a.std() > 0 and b.std() > 0:
                        rhos.append(float(spearmanr(a, b).statistic))
            stages[name].append({"randomized_fraction": fraction, "randomized_down_to": modules[upto - 1][0],
                                 "words": len(rhos), "mean_spearman": float(np.mean(rhos)) if rhos else None,
                                 "mean_abs_spearman": float(np.mean(np.abs(rhos))) if rhos else None})
    per_method = {}
    for name in names:
        final = stages[name][-1]["mean_abs_spearman"]
        per_method[name] = {"stages": stages[name], "final_mean_abs_spearman": final,
                            "flagged": final is not None and final >= SANITY_THRESHOLD}
    return {"images": len(images), "threshold": SANITY_THRESHOLD, "stages": stages[names[0]],
            "methods": per_method, "flagged": [name for name in names if per_method[name]["flagged"]]}


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


def perturbation_study(vqa, items: Sequence[tuple[Image.Image, str]], method=None, layer=None,
                       steps: int = 10, seed: int = 0) -> dict:
    """Chefer's positive and negative perturbation AUCs of the answer's probability, per method
    (one explain call per question for all of them; the random order, one per question, is
    shared). ``items``: (image, question); a question the model refuses (ValueError) is skipped.
    The explained answer is the model's top answer on the whole image."""
    rng = np.random.default_rng(seed)
    names = _method_list(vqa, method)
    curves = ("positive", "negative")
    aucs = {(who, curve): [] for who in [*names, None] for curve in curves}  # None: the random order
    skipped = 0
    for pil, question in items:
        try:
            result = vqa.explain(pil, question, method=names, layer=layer)
        except ValueError:
            skipped += 1
            continue
        image = np.asarray(pil.convert("RGB"))
        gray = np.full_like(image, 128)
        for who in [*names, None]:
            if who is None:
                order = rng.permutation(image.shape[0] * image.shape[1])
            else:  # most relevant first; ties keep pixel order
                order = np.argsort(-result.method_maps[who][0][0].numpy().reshape(-1), kind="stable")
            for curve, ranked in (("positive", order), ("negative", order[::-1])):
                # the first k/steps of ``ranked`` grayed: deletion's frames in this order
                frames = _curve_images(gray, image, ranked, steps)
                probabilities = [vqa.answer_probabilities(vqa.prepare(frame, question)[0], [result.answer])[0]
                                 for frame in frames]
                aucs[(who, curve)].append(_auc(probabilities))
    done = len(aucs[(None, "positive")])
    if not done:
        return {"questions": 0, "skipped": skipped, "steps": steps, "methods": {}}
    random = {f"{curve}_auc_random": float(np.mean(aucs[(None, curve)])) for curve in curves}
    per_method = {name: {**{f"{curve}_auc_map": float(np.mean(aucs[(name, curve)])) for curve in curves}, **random}
                  for name in names}
    return {"questions": done, "skipped": skipped, "steps": steps, **per_method[names[0]], "methods": per_method}


def faithfulness_study(captioner, images: Sequence[Image.Image], method=None, layer=None,
                       steps: int = 10, seed: int = 0) -> dict:
    """Deletion and insertion AUCs of word probabilities, map order against random order, per
    method (one explain call for all of them; the random order, one per word, is shared)."""
    rng = np.random.default_rng(seed)
    names = _method_list(captioner, method)
    results = captioner.explain_batch(list(images), method=names, layer=layer)
    curves = ("deletion", "insertion")
    aucs = {(who, curve): [] for who in [*names, None] for curve in curves}  # None: the random order
    for pil, result in zip(images, results):
        image = np.asarray(pil.convert("RGB"))
        gray = np.full_like(image, 128)
        blurred = np.asarray(pil.convert("RGB").filter(ImageFilter.GaussianBlur(8)))
        frames, owners = [], []
        for j in range(len(result.words)):
            orders = {name: np.argsort(-result.method_maps[name][0][j].numpy().reshape(-1), kind="stable")
                      for name in names}
            orders[None] = rng.permutation(image.shape[0] * image.shape[1])
            for who, order in orders.items():
                # deletion: the image with the most important pixels grayed first
                frames += _curve_images(gray, image, order, steps)
                owners.append((who, "deletion", j))
                frames += _curve_images(image, blurred, order, steps)
                owners.append((who, "insertion", j))
        scores = captioner.score_batch(frames, [result.caption] * len(frames))
        for n, (who, curve, j) in enumerate(owners):
            probabilities = [float(np.exp(s[j])) for s in scores[n * (steps + 1):(n + 1) * (steps + 1)]]
            aucs[(who, curve)].append(_auc(probabilities))
    random = {f"{curve}_auc_random": float(np.mean(aucs[(None, curve)])) for curve in curves}
    per_method = {name: {**{f"{curve}_auc_map": float(np.mean(aucs[(name, curve)])) for curve in curves}, **random}
                  for name in names}
    return {"images": len(images), "words": len(aucs[(None, "deletion")]), "steps": steps,
            **per_method[names[0]], "methods": per_method}
