"""Scores of one map against one ground-truth mask, the metric table, baselines, CIs.

Definitions (word-level COCO scoring; see docs/ARCHITECTURE.md):

- pointing game (``pointing_0px`` / ``pointing_15px``): a hit when the map's maximum lies inside
  the mask, or within 15 px of it (TorchRay's pointing game);
- energy pointing (``energy``): the share of the map's non-negative mass inside the mask;
- IoU@15% (``iou_15``): the map thresholded at 15% of its maximum, IoU with the mask;
- box localization (``box_iou`` / ``box_correct``): the box around the largest connected segment of
  the 15% threshold against the box around the mask; IoU >= 0.5 counts as correct;
- TAM's metrics (Li et al., "Token Activation Map to Visually Explain Multimodal LLMs", ICCV 2025),
  on the map min-max normalized to [0, 1] and binarized at each of ``PAPER_THRESHOLDS`` (0.05,
  0.10, ..., 0.95): Obj-IoU (``obj_iou``) is the best IoU with the mask over the thresholds (the
  paper reports it for object words); Func-IoU (``func_iou``) is how much a map lights up, the mean
  over the thresholds of the share of the image's pixels at or above the threshold (the paper
  reports it for function words, lower is better; we could not check the paper's exact formula, so
  this is our definition: an all-zero map scores 0, a flat positive map 1). F1-IoU, the harmonic
  mean of the nouns' Obj-IoU and 1 - the function words' Func-IoU, is computed from the class
  means in the summary (``summary.f1_iou``), not per word.

The mask of a (word, image) is the union of that category's instance masks. Every score is
computed for the method's map and for two baselines (a center Gaussian, uniform random noise).

``METRIC_TABLE`` is the one list of metrics: scoring (``score_map``), the summary's aggregates and
tables and the report's columns all read it, so a new metric is one ``register(Metric(...))``.

Two ways to score, same numbers (bit for bit on the CPU, tested): ``score_map`` / ``score_maps``
take one map at a time in numpy (the reference); ``score_batch`` takes N maps against N masks at
once with torch on the maps' device (what ``mmgradcam eval`` uses). A metric with a ``batched``
function is computed for all rows at once; one without falls back to its numpy ``score`` row by
row. Two parts stay per row on the CPU: the box metrics' connected-component labelling (scipy) and
the energy's two sums (numpy's order of additions, so that the last bit matches).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import torch
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


# TAM's grid of thresholds on the [0, 1]-normalized map (fixed, so runs and papers compare)
PAPER_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))


def _unit_map(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map (all zero included) becomes all zero (nothing lights up)."""
    low, high = float(heatmap.min()), float(heatmap.max())
    return (heatmap - low) / (high - low) if high > low else np.zeros(heatmap.shape)


def obj_iou(heatmap: np.ndarray, mask: np.ndarray, thresholds: Sequence[float] = PAPER_THRESHOLDS) -> float:
    """TAM's Obj-IoU: the best IoU with ``mask`` of the normalized map binarized at a threshold."""
    unit = _unit_map(np.asarray(heatmap, dtype=np.float64))
    return max(iou(unit >= t, mask) for t in thresholds)


def func_iou(heatmap: np.ndarray, thresholds: Sequence[float] = PAPER_THRESHOLDS) -> float:
    """Func-IoU (our reading of TAM's): the mean over the thresholds of the share of pixels whose
    normalized value is at or above it, i.e. how much of the image a map lights up (lower is
    better for function words, which have no object to point at)."""
    unit = _unit_map(np.asarray(heatmap, dtype=np.float64))
    return float(np.mean([(unit >= t).mean() for t in thresholds]))


def f1_iou(obj: float, func: float) -> float:
    """F1-IoU: the harmonic mean of Obj-IoU and 1 - Func-IoU (0 when both are 0; NaN in, NaN out)."""
    keep = 1.0 - func
    if np.isnan(obj) or np.isnan(keep):
        return float("nan")
    return 2 * obj * keep / (obj + keep) if obj + keep > 0 else 0.0


class MapAndMask:
    """One map against one mask, with what several metrics share (the mask's distance transform,
    the box IoU) computed at most once and only when a metric asks for it."""

    def __init__(self, heatmap: np.ndarray, mask: np.ndarray, tolerance: float = TOLERANCE_PX,
                 distance_to_mask: np.ndarray | None = None):
        self.heatmap = np.asarray(heatmap, dtype=np.float64)
        self.mask = np.asarray(mask, dtype=bool)
        if self.heatmap.shape != self.mask.shape:
            raise ValueError(f"map shape {self.heatmap.shape} differs from mask shape {self.mask.shape}")
        self.tolerance = tolerance
        if distance_to_mask is not None:
            self.__dict__["distance"] = distance_to_mask  # seeds the cached property

    @cached_property
    def distance(self) -> np.ndarray:
        return ndimage.distance_transform_edt(~self.mask)

    @cached_property
    def box_overlap(self) -> float:
        return box_iou(self.heatmap, self.mask)


def near_mask(mask: np.ndarray, tolerance: float = TOLERANCE_PX) -> np.ndarray:
    """Pixels within ``tolerance`` px of ``mask`` (the mask included): the tolerant pointing game's
    target, from one distance transform. An evaluation computes it once per mask, where it decodes
    the mask, and reuses it for every word scored against it."""
    return ndimage.distance_transform_edt(~np.asarray(mask, dtype=bool)) <= tolerance


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator in float64 (float32 on MPS), 0 where the denominator is 0."""
    dtype = torch.float32 if numerator.device.type == "mps" else torch.float64
    numerator, denominator = numerator.to(dtype), denominator.to(dtype)
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1), 0)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of two (N, H, W) boolean stacks: (intersection, union) pixel counts."""
    return (a & b).sum(dim=(1, 2)), (a | b).sum(dim=(1, 2))


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, 4) int64 boxes (y0, x0, y1, x1; exclusive ends) of (N, H, W) boolean masks; -1 rows
    where a mask is empty."""
    boxes = []
    for lines in (masks.any(dim=2), masks.any(dim=1)):  # rows, then columns
        hit = lines.to(torch.uint8)
        first = hit.argmax(dim=1)  # argmax returns the first of equal maxima
        last = lines.shape[1] - hit.flip(1).argmax(dim=1)
        boxes.append((first, last))
    out = torch.stack([boxes[0][0], boxes[1][0], boxes[0][1], boxes[1][1]], dim=1)
    return torch.where(masks.flatten(1).any(dim=1)[:, None], out, -1)


_STEPS = len(PAPER_THRESHOLDS) + 1
# the thresholds with -inf / +inf at the ends: _LOWER[c] is the c-th threshold (the last one a
# count of c has passed), _UPPER[c] the next one
_LOWER = torch.tensor((-np.inf,) + PAPER_THRESHOLDS, dtype=torch.float64)
_UPPER = torch.tensor(PAPER_THRESHOLDS + (np.inf,), dtype=torch.float64)


def _threshold_count(unit: torch.Tensor) -> torch.Tensor:
    """int64, same shape: how many of PAPER_THRESHOLDS (0.05, 0.10, ..., 0.95) are <= each value of
    ``unit`` (in [0, 1]), exactly as comparing with each threshold. floor(20 u) is off by at most one
    next to a threshold (rounding of 20 u and of round(0.05 k, 2)); one comparison each way with the
    exact thresholds corrects it. About 2x cheaper than ``torch.bucketize`` on the CPU."""
    lower, upper = _LOWER.to(unit), _UPPER.to(unit)
    count = (unit * _STEPS).to(torch.int64).clamp_(0, _STEPS - 1)
    count -= (torch.take(lower, count) > unit).to(torch.int64)
    count += (torch.take(upper, count) <= unit).to(torch.int64)
    return count


_CROSS = ndimage.generate_binary_structure(2, 1)  # ndimage.label's default: 4-connectivity


def _largest_segment_boxes(regions: np.ndarray) -> np.ndarray:
    """(N, 4) boxes of the largest connected segment (4-connectivity, the smallest label among equal
    sizes: as ``box_iou``) of each of N boolean regions; -1 rows for empty regions. Labelling is
    scipy's, one region at a time on the CPU (one 3-D call with a flat structure is slower); a
    region seen before (the center baseline's, once per mask) is labelled once."""
    boxes = np.full((len(regions), 4), -1, dtype=np.int64)
    seen: dict[bytes, np.ndarray] = {}
    for i, region in enumerate(regions):
        key = region.tobytes()
        if key in seen:
            boxes[i] = seen[key]
            continue
        labels, count = ndimage.label(region, _CROSS)
        if count:
            segment = region if count == 1 else labels == int(np.bincount(labels.ravel())[1:].argmax()) + 1
            rows, cols = np.flatnonzero(segment.any(axis=1)), np.flatnonzero(segment.any(axis=0))
            boxes[i] = rows[0], cols[0], rows[-1] + 1, cols[-1] + 1
        seen[key] = boxes[i]
    return boxes


class MapsAndMasks:
    """N maps against N masks at once (row i: ``maps[i]`` on ``masks[i]``), with torch on the maps'
    device: what the batched metrics share (the peak, the 15% region, the normalized map's counts,
    the box IoU) computed at most once. ``near``: pixels within ``tolerance`` of each mask
    (``near_mask``); computed from the masks when None."""

    def __init__(self, maps: torch.Tensor, masks: torch.Tensor, near: torch.Tensor | None = None,
                 tolerance: float = TOLERANCE_PX):
        if maps.dim() != 3 or maps.shape != masks.shape or (near is not None and near.shape != masks.shape):
            raise ValueError(f"maps {tuple(maps.shape)}, masks {tuple(masks.shape)} and near "
                             f"{None if near is None else tuple(near.shape)} must be equal (N, H, W) stacks")
        # float64 as the numpy reference (float32 where the device has no float64: Apple MPS)
        self.dtype = torch.float32 if maps.device.type == "mps" else torch.float64
        self.maps = maps.to(self.dtype)
        self.masks = masks.to(device=maps.device, dtype=torch.bool)
        self.tolerance = tolerance
        if near is not None:
            self.__dict__["near"] = near.to(device=maps.device, dtype=torch.bool)  # seeds the cached property

    @cached_property
    def near(self) -> torch.Tensor:
        masks = self.masks.cpu().numpy()
        return torch.from_numpy(np.stack([near_mask(m, self.tolerance) for m in masks])).to(self.maps.device)

    @cached_property
    def cpu_maps(self) -> np.ndarray:
        return self.maps.cpu().numpy()

    @cached_property
    def cpu_masks(self) -> np.ndarray:
        return self.masks.cpu().numpy()

    @cached_property
    def peak_index(self) -> torch.Tensor:
        return self.maps.flatten(1).argmax(dim=1)  # the first of equal maxima, as numpy's argmax

    def at_peak(self, grid: torch.Tensor) -> torch.Tensor:
        """(N,): each row's value of ``grid`` (N, H, W) at its map's maximum."""
        return grid.flatten(1).gather(1, self.peak_index[:, None])[:, 0]

    @cached_property
    def region(self) -> torch.Tensor:
        """The maps thresholded at 15% of their maximum (empty where the maximum is not positive)."""
        top = self.maps.amax(dim=(1, 2), keepdim=True)
        return (self.maps >= THRESHOLD * top) & (top > 0)

    @cached_property
    def paper_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(above, inside), each (N, len(PAPER_THRESHOLDS)): pixels of the min-max normalized map at
        or above each threshold, and those of them inside the mask (one histogram for all thresholds)."""
        n, slots = len(self.maps), len(PAPER_THRESHOLDS) + 1
        low = self.maps.amin(dim=(1, 2), keepdim=True)
        span = self.maps.amax(dim=(1, 2), keepdim=True) - low
        # a constant map divides by infinity: all 0, as ``_unit_map``
        unit = (self.maps - low).div_(torch.where(span > 0, span, torch.inf))
        bucket = _threshold_count(unit)  # value >= threshold j exactly when j < bucket
        # one histogram: slot (row, bucket) for pixels outside the mask, shifted by n * slots inside
        bucket += slots * torch.arange(n, device=unit.device)[:, None, None]
        bucket += (n * slots) * self.masks
        counts = torch.bincount(bucket.flatten(), minlength=2 * n * slots).view(2, n, slots)
        above, inside = ((c.flip(1).cumsum(dim=1).flip(1)[:, 1:]) for c in (counts[0] + counts[1], counts[1]))
        return above, inside

    @cached_property
    def box_overlap(self) -> torch.Tensor:
        """Box IoU of the largest segment of the 15% region with the mask's box (as ``box_iou``)."""
        a = torch.from_numpy(_largest_segment_boxes(self.region.cpu().numpy())).to(self.maps.device)
        b = _mask_boxes(self.masks)
        inter = ((torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
                 * (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0))
        union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
        return torch.where((a[:, 0] >= 0) & (b[:, 0] >= 0), _ratio(inter, union), 0).to(self.dtype)

    def rows(self) -> Iterator[MapAndMask]:
        """Row by row in numpy (metrics without a batched version)."""
        maps, masks = self.cpu_maps, self.cpu_masks
        near = self.__dict__.get("near")
        for i in range(len(maps)):
            # a distance of 0 inside ``near`` and beyond the tolerance outside reads as the transform
            distance = None if near is None else np.where(near[i].cpu().numpy(), 0.0, np.inf)
            yield MapAndMask(maps[i], masks[i], self.tolerance, distance)


# ----------------------------------------------------------------------------- the metric table
# Where a metric is shown besides results.jsonl and the summary's aggregates (which hold every metric):
METHOD_TABLE = "method_table"  # a column of the method x word class table (summary.json/md, report)
CLASSES = "classes"            # a row of summary.md's per word class tables
WORDS = "words"                # a column of the report's per-word table
COMPACT = "compact"            # the narrow tables and plots (per category, VQA, methods.png)
DEFAULT_VIEWS = frozenset({METHOD_TABLE, CLASSES, WORDS})


@dataclass(frozen=True)
class Metric:
    """One entry of the metric table: its results/summary key, how to compute it, where it shows."""

    key: str                                # the key in results.jsonl and summary.json
    label: str                              # column header in summary.md and the report
    score: Callable[[MapAndMask], float]    # one map against one mask
    binary: bool = False                    # a 0/1 hit per word (plotted as a hit rate)
    short: str = ""                         # label after "center"/"random" in narrow tables
    description: str = ""                   # an axis label saying what the number is
    views: frozenset = field(default=DEFAULT_VIEWS)
    # N maps against N masks at once -> (N,) scores; None: ``score`` row by row (numpy)
    batched: Callable[["MapsAndMasks"], torch.Tensor] | None = None

    def short_label(self) -> str:
        return self.short or self.label


def _pointing_0px(s: MapAndMask) -> float:
    return float(pointing_hit(s.heatmap, s.mask, 0))


def _pointing_tolerance(s: MapAndMask) -> float:
    return float(pointing_hit(s.heatmap, s.mask, s.tolerance, s.distance if s.tolerance > 0 else None))


def _energy(s: MapAndMask) -> float:
    return energy_inside(s.heatmap, s.mask)


def _iou_15(s: MapAndMask) -> float:
    return iou(threshold_region(s.heatmap), s.mask)


def _box_overlap(s: MapAndMask) -> float:
    return s.box_overlap


def _box_correct(s: MapAndMask) -> float:
    return float(s.box_overlap >= 0.5)


def _obj_iou(s: MapAndMask) -> float:
    return obj_iou(s.heatmap, s.mask)


def _func_iou(s: MapAndMask) -> float:
    return func_iou(s.heatmap)


# the batched (torch) versions of the built-in metrics, on MapsAndMasks (defined below)
def _pointing_0px_batched(s: "MapsAndMasks") -> torch.Tensor:
    return s.at_peak(s.masks).to(s.dtype)


def _pointing_tolerance_batched(s: "MapsAndMasks") -> torch.Tensor:
    return s.at_peak(s.near if s.tolerance > 0 else s.masks).to(s.dtype)


def _energy_batched(s: "MapsAndMasks") -> torch.Tensor:
    # numpy's sums, row by row on the CPU (about 0.05 ms a row): torch adds in another order and the
    # last bit would differ from ``energy_inside``; with numpy's, results match the reference exactly
    return torch.tensor([energy_inside(m, k) for m, k in zip(s.cpu_maps, s.cpu_masks)], dtype=torch.float64)


def _iou_15_batched(s: "MapsAndMasks") -> torch.Tensor:
    return _ratio(*_overlap(s.region, s.masks))


def _box_overlap_batched(s: "MapsAndMasks") -> torch.Tensor:
    return s.box_overlap


def _box_correct_batched(s: "MapsAndMasks") -> torch.Tensor:
    return (s.box_overlap >= 0.5).to(s.dtype)


def _obj_iou_batched(s: "MapsAndMasks") -> torch.Tensor:
    above, inside = s.paper_counts
    union = above + s.masks.sum(dim=(1, 2))[:, None] - inside
    return _ratio(inside, union).amax(dim=1)


def _func_iou_batched(s: "MapsAndMasks") -> torch.Tensor:
    above, _ = s.paper_counts
    # the shares' mean in numpy (N x 19 numbers): the same additions, so the same bits, as ``func_iou``
    shares = above.cpu().numpy() / (s.maps.shape[1] * s.maps.shape[2])
    return torch.from_numpy(np.mean(shares, axis=1))


# Order matters: it is the key order of every scores dict in results.jsonl and summary.json (a
# resumed run appends lines to shards an earlier process wrote, so it must never change).
METRIC_TABLE: list[Metric] = [
    Metric("pointing_0px", "pointing 0px", _pointing_0px, binary=True, views=frozenset({METHOD_TABLE, CLASSES}),
           batched=_pointing_0px_batched),
    Metric("pointing_15px", "pointing 15px", _pointing_tolerance, binary=True, short="pointing",
           views=frozenset({METHOD_TABLE, CLASSES, WORDS, COMPACT}), batched=_pointing_tolerance_batched),
    Metric("energy", "energy", _energy, description="share of map mass inside the mask",
           views=frozenset({METHOD_TABLE, CLASSES, WORDS, COMPACT}), batched=_energy_batched),
    Metric("iou_15", "IoU@15%", _iou_15, batched=_iou_15_batched),
    Metric("box_iou", "box IoU", _box_overlap, views=frozenset(), batched=_box_overlap_batched),
    Metric("box_correct", "box correct", _box_correct, binary=True, views=frozenset({CLASSES}),
           batched=_box_correct_batched),
    # TAM's (ICCV 2025) metrics, appended: Obj-IoU matters for object words, Func-IoU for function words
    Metric("obj_iou", "Obj-IoU", _obj_iou, description="best IoU over thresholds 0.05..0.95 of the normalized map",
           views=frozenset({METHOD_TABLE, WORDS}), batched=_obj_iou_batched),
    Metric("func_iou", "Func-IoU", _func_iou, description="mean share of pixels above thresholds 0.05..0.95",
           views=frozenset({METHOD_TABLE}), batched=_func_iou_batched),
]
LEAD = "pointing_15px"  # the pointing game leads the per-class tables and is the per-category plot
RANK_BY = "energy"      # continuous: ranks words (gallery, report views), compared with the baselines per word


def register(metric: Metric) -> Metric:
    """Add a metric to the table (after the built-in ones); its key must be new."""
    if metric.key in metric_keys():
        raise ValueError(f"metric {metric.key!r} is already in the table")
    METRIC_TABLE.append(metric)
    return metric


def unregister(key: str) -> None:
    METRIC_TABLE[:] = [m for m in METRIC_TABLE if m.key != key]


@contextmanager
def registered(metric: Metric) -> Iterator[Metric]:
    """``register`` for the duration of a block (tests, experiments)."""
    register(metric)
    try:
        yield metric
    finally:
        unregister(metric.key)


def get_metric(key: str) -> Metric:
    for metric in METRIC_TABLE:
        if metric.key == key:
            return metric
    raise KeyError(f"no metric {key!r}; the table has {metric_keys()}")


def metric_keys(view: str | None = None) -> tuple[str, ...]:
    """Every metric's key in table order, or those shown in ``view`` (read at call time, so a
    metric registered later is included)."""
    return tuple(m.key for m in METRIC_TABLE if view is None or view in m.views)


def headline_keys() -> tuple[str, ...]:
    """summary.md's per-class rows: the lead metric first, then the others of the view in order."""
    keys = metric_keys(CLASSES)
    return tuple([LEAD] if LEAD in keys else []) + tuple(k for k in keys if k != LEAD)


def score_map(heatmap: np.ndarray, mask: np.ndarray, tolerance: float = TOLERANCE_PX,
              distance_to_mask: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of the table for one map against one mask (pass ``distance_to_mask`` to reuse it)."""
    scored = MapAndMask(heatmap, mask, tolerance, distance_to_mask)
    return {metric.key: metric.score(scored) for metric in METRIC_TABLE}


def score_maps(heatmaps: dict[str, np.ndarray], mask: np.ndarray,
               distance_to_mask: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """``score_map`` for several maps of one mask (every method's and the baselines'), sharing the
    mask's distance transform (pass ``distance_to_mask`` to reuse one across calls)."""
    mask = np.asarray(mask, dtype=bool)
    distance = ndimage.distance_transform_edt(~mask) if distance_to_mask is None else distance_to_mask
    return {name: score_map(heatmap, mask, distance_to_mask=distance) for name, heatmap in heatmaps.items()}


def chunk_elements(device: torch.device | str) -> int:
    """Pixels scored together: on a CPU a chunk that stays in cache (16 maps of 128 x 128; larger
    chunks measured 1.5-2x slower), on an accelerator enough to fill it."""
    return 1 << 18 if torch.device(device).type == "cpu" else 1 << 24


def score_batch(maps: torch.Tensor, masks: torch.Tensor, near: torch.Tensor | None = None,
                tolerance: float = TOLERANCE_PX, max_elements: int | None = None) -> list[dict[str, float]]:
    """Every metric of the table for N maps (N, H, W) against N masks (row i: ``maps[i]`` on
    ``masks[i]``) with torch on the maps' device: ``score_map``'s numbers row by row (the same
    bits on the CPU: tested). ``near``: pixels within ``tolerance`` of each mask
    (``near_mask``, computed when None). Rows go in chunks of at most ``max_elements`` pixels
    (default ``chunk_elements``), which bounds memory on large images."""
    if len(maps) == 0:
        return []
    max_elements = chunk_elements(maps.device) if max_elements is None else max_elements
    chunk = max(1, max_elements // (maps.shape[1] * maps.shape[2]))
    columns: dict[str, list[float]] = {key: [] for key in metric_keys()}
    for start in range(0, len(maps), chunk):
        part = slice(start, start + chunk)
        scored = MapsAndMasks(maps[part], masks[part], None if near is None else near[part], tolerance)
        batched = [m for m in METRIC_TABLE if m.batched is not None]
        if batched:  # (a few are summed in numpy on the CPU: see _energy_batched)
            values = torch.stack([m.batched(scored).to("cpu", torch.float64) for m in batched]).tolist()
            for metric, column in zip(batched, values):
                columns[metric.key] += column
        rest = [m for m in METRIC_TABLE if m.batched is None]
        if rest:
            rows = list(scored.rows())
            for metric in rest:
                columns[metric.key] += [metric.score(row) for row in rows]
    return [{key: float(column[i]) for key, column in columns.items()} for i in range(len(maps))]


# The built-in metrics' keys (kept for callers of the old constant; use metric_keys() for the live table).
METRICS = metric_keys()


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
