"""Scoring explained captions and answers against COCO masks: one results line per scored word
(or answer) per method, each with the method's scores and both baselines'.

Every map is scored with every metric of the table (metrics.py). The baselines (center Gaussian,
uniform random) do not depend on the method, so they are scored once per word and written on
every method's line of it; the random baseline is seeded per word so reruns match.

Two paths, same lines: ``Scorer.caption`` / ``Scorer.answer`` score one item in numpy (the
reference); ``Scorer.score_jobs`` scores every word and answer of a batch at once with torch on
the scorer's device (``metrics.score_batch``), against a ``MaskSet``: an image's masks decoded
once, each with its 15 px neighbourhood precomputed (one distance transform per mask), which
``mmgradcam eval`` builds in its data-loader workers.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .coco import CocoData, Skip
from .metrics import (TOLERANCE_PX, center_gaussian, chunk_elements, near_mask, score_batch, score_maps,
                      uniform_random)
from .words import MappedWord, WordMapper

# (by category, by color, all objects' union or None): the masks a caption word can be scored on
ImageMasks = tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]


def word_seed(seed: int, image_id: int, source: str, index: int) -> int:
    """The random baseline's seed of one word (or question): fixed by the run's seed and the item."""
    return (seed * 1_000_003 + int(image_id) * 101 + index * 7 + (0 if source == "generated" else 3)) % (2**32)


def scores_with_baselines(heatmaps: dict[str, np.ndarray], mask: np.ndarray, seed: int,
                          distance: np.ndarray | None = None) -> tuple[dict[str, dict], dict, dict]:
    """Every method's scores, and the center and random baselines' (once: they do not depend on
    the method), against one mask."""
    scores = score_maps({"center": center_gaussian(mask.shape), "random": uniform_random(mask.shape, seed),
                         **{("method", name): heatmap for name, heatmap in heatmaps.items()}}, mask, distance)
    return {name: scores[("method", name)] for name in heatmaps}, scores["center"], scores["random"]


def image_masks(data: CocoData, image_id: int, height: int, width: int,
                decoded: list[tuple[dict, np.ndarray | None]] | None = None) -> tuple[ImageMasks, list[Skip]]:
    """The masks of one image's categories and colors, and of all its objects (what a function
    word is scored on; None when the image has none), with its unusable annotations (``decoded``:
    ``data.annotation_masks``' output, to reuse masks decoded already)."""
    by_category, by_color, bad = data.target_masks(image_id, height, width, decoded)
    objects = np.any(list(by_category.values()), axis=0) if by_category else None
    return (by_category, by_color, objects), bad


def mask_key(mapped: MappedWord) -> tuple[str, str | None]:
    """The MaskSet key of the mask a caption word is scored on: its category's, its color's, or
    (a function word) all objects' union."""
    return ("function", None) if mapped.word_class == "function" else (mapped.word_class, mapped.target)


@dataclass
class MaskSet:
    """One image's masks, decoded once, stacked for batched scoring: ``masks`` (M, H, W) bool,
    ``near`` (M, H, W) bool (pixels within 15 px of each mask: the tolerant pointing game, one
    distance transform per mask) and ``index`` (key -> row): ("noun", category), ("color",
    color), ("function", None) for all objects' union, ("answer", n) for the image's n-th question."""

    masks: torch.Tensor
    near: torch.Tensor
    index: dict[Hashable, int] = field(default_factory=dict)

    @classmethod
    def build(cls, masks: ImageMasks, size: tuple[int, int], answers: dict[Hashable, np.ndarray] | None = None,
              tolerance: float = TOLERANCE_PX) -> "MaskSet":
        by_category, by_color, objects = masks
        keyed = [(("noun", name), m) for name, m in by_category.items()]
        keyed += [(("color", name), m) for name, m in by_color.items()]
        keyed += [(("function", None), objects)] if objects is not None else []
        keyed += [(("answer", key), m) for key, m in (answers or {}).items()]
        if not keyed:
            empty = torch.zeros((0, *size), dtype=torch.bool)
            return cls(empty, empty.clone(), {})
        stack = np.stack([np.asarray(m, dtype=bool) for _, m in keyed])
        near: dict[bytes, np.ndarray] = {}  # a category's and a color's mask are often the same
        rows = []
        for m in stack:
            key = m.tobytes()
            if key not in near:
                near[key] = near_mask(m, tolerance)
            rows.append(near[key])
        return cls(torch.from_numpy(stack), torch.from_numpy(np.stack(rows)),
                   {key: i for i, (key, _) in enumerate(keyed)})

    def get(self, key: Hashable) -> int | None:
        return self.index.get(key)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MaskSet":
        return MaskSet(self.masks.to(device, non_blocking=non_blocking),
                       self.near.to(device, non_blocking=non_blocking), self.index)

    def pin_memory(self) -> "MaskSet":
        return MaskSet(self.masks.pin_memory(), self.near.pin_memory(), self.index)


@dataclass
class CaptionJob:
    """One explained caption to score (``Scorer.score_jobs``)."""

    image_id: int
    source: str  # "generated" or "reference"
    result: Any  # a CaptionExplanation with ``method_maps``
    masks: MaskSet
    methods: list[str]


@dataclass
class AnswerJob:
    """One explained answer to score against its question's objects (``masks.index[mask_key]``)."""

    image_id: int
    question: dict
    result: Any  # a VQA explanation with ``method_maps``
    masks: MaskSet
    mask_key: Hashable
    methods: list[str]


class _Rows:
    """Maps to score, each against one row of a MaskSet; scored together per image size."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.maps: list[torch.Tensor] = []
        self.targets: list[tuple[MaskSet, int]] = []
        self.centers: dict[tuple[int, int], int] = {}  # (MaskSet, row) -> the center baseline's row
        self.scores: list[dict[str, float]] = []

    def add(self, heatmap: torch.Tensor, masks: MaskSet, row: int) -> int:
        self.maps.append(heatmap)
        self.targets.append((masks, row))
        return len(self.maps) - 1

    def center(self, masks: MaskSet, row: int) -> int:
        """The center baseline against one mask: the same map for every word of an image, so
        scored once per mask, not once per word."""
        key = (id(masks), row)
        if key not in self.centers:
            shape = tuple(masks.masks.shape[1:])
            self.centers[key] = self.add(_center_tensor(shape), masks, row)
        return self.centers[key]

    def random(self, masks: MaskSet, row: int, seed: int) -> int:
        """The uniform-random baseline of one word (seeded per word) against one mask."""
        shape = tuple(masks.masks.shape[1:])
        return self.add(torch.from_numpy(uniform_random(shape, seed)), masks, row)

    def score(self) -> list[dict[str, float]]:
        scores: list[dict[str, float] | None] = [None] * len(self.maps)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, heatmap in enumerate(self.maps):
            groups.setdefault(tuple(heatmap.shape), []).append(i)
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        budget = chunk_elements(self.device)
        for shape, members in groups.items():
            step = max(1, budget // (shape[0] * shape[1]))
            for start in range(0, len(members), step):  # stacked chunk by chunk: stays in cache on a CPU
                part = members[start:start + step]
                maps = torch.stack([self.maps[i] for i in part]).to(self.device, dtype)  # float32 maps, float64 baselines
                masks = torch.stack([self.targets[i][0].masks[self.targets[i][1]] for i in part]).to(self.device)
                near = torch.stack([self.targets[i][0].near[self.targets[i][1]] for i in part]).to(self.device)
                for i, row in zip(part, score_batch(maps, masks, near, max_elements=budget)):
                    scores[i] = row
        return scores  # type: ignore[return-value]


_CENTERS: dict[tuple[int, int], torch.Tensor] = {}


def _center_tensor(shape: tuple[int, int]) -> torch.Tensor:
    if shape not in _CENTERS:
        _CENTERS[shape] = torch.from_numpy(center_gaussian(shape).copy())
    return _CENTERS[shape]


@dataclass
class Scorer:
    """Turns one explained caption or answer into results lines. ``keep`` receives the first
    method's map of every scored object word and answer (the report's thumbnails)."""

    mapper: WordMapper
    seed: int = 0
    function_words: bool = True
    keep: Callable[[str, np.ndarray], None] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where score_jobs scores

    def caption(self, batch: int, image_id: int, source: str, result, masks: ImageMasks,
                methods: list[str]) -> list[dict]:
        """Lines of every scorable word of one explained caption (``result.method_maps``)."""
        by_category, by_color, objects = masks
        lines = []
        distances: dict[tuple[str, str], np.ndarray] = {}  # one distance transform per mask
        for mapped in self.mapper.classify(result.words, self.function_words):
            if mapped.word_class == "function":
                mask = objects
            else:
                mask = (by_category if mapped.word_class == "noun" else by_color).get(mapped.target)
            if mask is None:
                continue  # no instance of the word's category (or color; any object) in this image: not scored
            key = (mapped.word_class, mapped.target)
            if key not in distances:
                distances[key] = ndimage.distance_transform_edt(~mask)
            heatmaps = {name: result.method_maps[name][0][mapped.index].numpy() for name in methods}
            scores, center, random = scores_with_baselines(
                heatmaps, mask, word_seed(self.seed, image_id, source, mapped.index), distances[key])
            if mapped.word_class != "function" and self.keep is not None:  # reports show object words' maps
                self.keep(f"{image_id}/{source}/{mapped.index}", heatmaps[methods[0]])
            lines += _word_lines(batch, image_id, source, result, mapped, methods, scores, center, random)
        return lines

    def answer(self, batch: int, image_id: int, question: dict, result, mask: np.ndarray,
               methods: list[str]) -> list[dict]:
        """Lines of one explained answer (``result.method_maps``) against its question's objects."""
        heatmaps = {name: result.method_maps[name][0][0].numpy() for name in methods}
        scores, center, random = scores_with_baselines(
            heatmaps, mask, word_seed(self.seed, image_id, "vqa", int(question["question_id"])))
        if self.keep is not None:
            self.keep(f"{image_id}/vqa/{question['question_id']}", heatmaps[methods[0]])
        return _answer_lines(batch, image_id, question, result, methods, scores, center, random)

    def score_jobs(self, batch: int, jobs: list[CaptionJob | AnswerJob]) -> list[list[dict]]:
        """Each job's lines (as ``caption`` / ``answer`` give them) with every map of the batch
        scored at once, with torch on ``self.device``: one row per scored word and method, per
        word its random baseline and per mask its center baseline (the same map for every word)."""
        rows = _Rows(self.device)
        plans = []
        for job in jobs:
            if isinstance(job, CaptionJob):
                words = []
                for mapped in self.mapper.classify(job.result.words, self.function_words):
                    row = job.masks.get(mask_key(mapped))
                    if row is None:
                        continue  # no instance of the word's category (or color; any object): not scored
                    maps = {name: job.result.method_maps[name][0][mapped.index] for name in job.methods}
                    if mapped.word_class != "function" and self.keep is not None:  # reports show object words' maps
                        self.keep(f"{job.image_id}/{job.source}/{mapped.index}", maps[job.methods[0]].numpy())
                    seed = word_seed(self.seed, job.image_id, job.source, mapped.index)
                    words.append((mapped, {name: rows.add(m, job.masks, row) for name, m in maps.items()},
                                  rows.center(job.masks, row), rows.random(job.masks, row, seed)))
                plans.append(words)
            else:
                row = job.masks.index[job.mask_key]
                maps = {name: job.result.method_maps[name][0][0] for name in job.methods}
                seed = word_seed(self.seed, job.image_id, "vqa", int(job.question["question_id"]))
                if self.keep is not None:
                    self.keep(f"{job.image_id}/vqa/{job.question['question_id']}", maps[job.methods[0]].numpy())
                plans.append(({name: rows.add(m, job.masks, row) for name, m in maps.items()},
                              rows.center(job.masks, row), rows.random(job.masks, row, seed)))
        scores = rows.score()
        out = []
        for job, plan in zip(jobs, plans):
            if isinstance(job, CaptionJob):
                lines = []
                for mapped, methods, center, random in plan:
                    lines += _word_lines(batch, job.image_id, job.source, job.result, mapped, job.methods,
                                         {name: scores[i] for name, i in methods.items()}, dict(scores[center]),
                                         scores[random])
                out.append(lines)
            else:
                methods, center, random = plan
                out.append(_answer_lines(batch, job.image_id, job.question, job.result, job.methods,
                                         {name: scores[i] for name, i in methods.items()}, dict(scores[center]),
                                         scores[random]))
        return out


def _word_lines(batch: int, image_id: int, source: str, result, mapped: MappedWord, methods: list[str],
                scores: dict[str, dict], center: dict, random: dict) -> list[dict]:
    """One results line per method of one scored caption word (both paths write these)."""
    return [{"kind": "word", "batch": batch, "image_id": image_id, "source": source,
             "caption": result.caption, "word_index": mapped.index, "word": mapped.word,
             "class": mapped.word_class, "target": mapped.target, "method": name,
             "logprob": result.word_logprobs[mapped.index], "model": scores[name],
             "center": center, "random": random} for name in methods]


def _answer_lines(batch: int, image_id: int, question: dict, result, methods: list[str],
                  scores: dict[str, dict], center: dict, random: dict) -> list[dict]:
    truth = question.get("multiple_choice_answer")
    return [{"kind": "answer", "batch": batch, "image_id": image_id, "question_id": question["question_id"],
             "question": question["question"], "question_type": question.get("question_type", ""),
             "method": name, "answer": result.answer, "truth": truth, "correct": result.answer == truth,
             "model": scores[name], "center": center, "random": random} for name in methods]
