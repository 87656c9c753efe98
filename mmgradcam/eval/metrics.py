"""Scores of one map against one ground-truth mask (definitions in DESIGN.md), baselines, CIs."""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import ndimage

THRESHOLD = 0.15
TOLERANCE_PX = 15


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray, tolerance: float = 0.0,
                 distance_to_mask: np.ndarray | None = None) -> bool:
    """Is the map's maximum within ``tolerance`` pixels of the mask? (TorchRay's pointing game)."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if mask[y, x]:
        return True
    if tolerance <= 0:
        return False
    if distance_to_mask is None:
        distance_to_mask = ndimage.distance_transform_edt(~mask)
    return bool(distance_to_mask[y, x] <= tolerance)


def energy_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's non-negative mass inside the mask (0 for an all-zero map)."""
    mass = np.clip(heatmap, 0, None)
    total = float(mass.sum())
    return float(mass[mask].sum()) / total if total > 0 else 0.0


def threshold_region(heatmap: np.ndarray, fraction: float = THRESHOLD) -> np.ndarray:
    top = float(heatmap.max())
    if top <= 0:
        return np.zeros(heatmap.shape, dtype=bool)
    return heatmap >= fraction * top


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum()) / float(union) if union else 0.0


def _box(region: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1), exclusive ends, of a boolean region; None when it is empty."""
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter_h = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_w = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_h * inter_w
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def box_iou(heatmap: np.ndarray, mask: np.ndarray, fraction: float = THRESHOLD) -> float:
    """IoU of the box around the largest connected segment of the thresholded map with the box
    around the mask (union of the category's instances)."""
    region = threshold_region(heatmap, fraction)
    labels, count = ndimage.label(region)
    mask_box = _box(mask)
    if count == 0 or mask_box is None:
        return 0.0
    largest = labels == int(np.bincount(labels.ravel())[1:].argmax()) + 1
    return _box_iou(_box(largest), mask_box)


def score_map(heatmap: np.ndarray, mask: np.ndarray, tolerance: float = TOLERANCE_PX,
              distance_to_mask: np.ndarray | None = None) -> dict[str, float]:
    """All word-level metrics of one map against one mask (pass ``distance_to_mask`` to reuse it)."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if heatmap.shape != mask.shape:
        raise ValueError(f"map shape {heatmap.shape} differs from mask shape {mask.shape}")
    if tolerance > 0 and distance_to_mask is None:
        distance_to_mask = ndimage.distance_transform_edt(~mask)
    box = box_iou(heatmap, mask)
    return {
        "pointing_0px": float(pointing_hit(heatmap, mask, 0)),
        "pointing_15px": float(pointing_hit(heatmap, mask, tolerance, distance_to_mask)),
        "energy": energy_inside(heatmap, mask),
        "iou_15": iou(threshold_region(heatmap), mask),
        "box_iou": box,
        "box_correct": float(box >= 0.5),
    }


def score_maps(heatmaps: dict[str, np.ndarray], mask: np.ndarray,
               distance_to_mask: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """``score_map`` for several maps of one mask (every method's and the baselines'), sharing the
    mask's distance transform (pass ``distance_to_mask`` to reuse one across calls)."""
    mask = np.asarray(mask, dtype=bool)
    distance = ndimage.distance_transform_edt(~mask) if distance_to_mask is None else distance_to_mask
    return {name: score_map(heatmap, mask, distance_to_mask=distance) for name, heatmap in heatmaps.items()}


METRICS = ("pointing_0px", "pointing_15px", "energy", "iou_15", "box_iou", "box_correct")


@lru_cache(maxsize=32)
def center_gaussian(shape: tuple[int, int], sigma_fraction: float = 0.25) -> np.ndarray:
    """The center baseline: a Gaussian at the image center, sigma a fraction of each side
    (cached per shape; the array is read-only)."""
    h, w = shape
    ys = (np.arange(h) - (h - 1) / 2) / (sigma_fraction * h)
    xs = (np.arange(w) - (w - 1) / 2) / (sigma_fraction * w)
    gaussian = np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    gaussian.setflags(write=False)
    return gaussian


def uniform_random(shape: tuple[int, int], seed: int) -> np.ndarray:
    """The random baseline: i.i.d. uniform values, seeded per word so runs are reproducible."""
    return np.random.default_rng(seed).random(shape)


def bootstrap_ci(values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean with a percentile bootstrap confidence interval."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(data.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bootstrap_cis(columns: dict[str, Sequence[float]], samples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """``bootstrap_ci`` of several equally long columns (e.g. every metric of one group of words),
    drawing the resampling indices once: the same numbers as one ``bootstrap_ci`` call per column
    (same seed, same size, same draws), at a fraction of the cost."""
    arrays = {key: np.asarray(values, dtype=np.float64) for key, values in columns.items()}
    sizes = {a.size for a in arrays.values()}
    if len(sizes) > 1:
        raise ValueError(f"columns of different lengths: {sorted(sizes)}")
    size = sizes.pop() if sizes else 0
    if size == 0:
        return {key: (float("nan"), float("nan"), float("nan")) for key in arrays}
    index = np.random.default_rng(seed).integers(0, size, size=(samples, size))
    alpha = (1 - level) / 2
    out = {}
    for key, data in arrays.items():
        means = data[index].mean(axis=1)
        out[key] = (float(data.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))
    return out
