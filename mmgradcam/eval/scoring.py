"""Scoring explained captions and answers against COCO masks: one results line per scored word
(or answer) per method, each with the method's scores and both baselines'.

Every map is scored with every metric of the table (metrics.py). The baselines (center Gaussian,
uniform random) do not depend on the method, so they are scored once per word and written on
every method's line of it; the random baseline is seeded per word so reruns match.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .coco import CocoData, Skip
from .metrics import center_gaussian, score_maps, uniform_random
from .words import WordMapper

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


def image_masks(data: CocoData, image_id: int, height: int, width: int) -> tuple[ImageMasks, list[Skip]]:
    """The masks of one image's categories and colors, and of all its objects (what a function
    word is scored on; None when the image has none), with its unusable annotations."""
    by_category, by_color, bad = data.target_masks(image_id, height, width)
    objects = np.any(list(by_category.values()), axis=0) if by_category else None
    return (by_category, by_color, objects), bad


@dataclass
class Scorer:
    """Turns one explained caption or answer into results lines. ``keep`` receives the first
    method's map of every scored object word and answer (the report's thumbnails)."""

    mapper: WordMapper
    seed: int = 0
    function_words: bool = True
    keep: Callable[[str, np.ndarray], None] | None = None

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
            for name in methods:
                lines.append({"kind": "word", "batch": batch, "image_id": image_id, "source": source,
                              "caption": result.caption, "word_index": mapped.index, "word": mapped.word,
                              "class": mapped.word_class, "target": mapped.target, "method": name,
                              "logprob": result.word_logprobs[mapped.index], "model": scores[name],
                              "center": center, "random": random})
        return lines

    def answer(self, batch: int, image_id: int, question: dict, result, mask: np.ndarray,
               methods: list[str]) -> list[dict]:
        """Lines of one explained answer (``result.method_maps``) against its question's objects."""
        truth = question.get("multiple_choice_answer")
        heatmaps = {name: result.method_maps[name][0][0].numpy() for name in methods}
        scores, center, random = scores_with_baselines(
            heatmaps, mask, word_seed(self.seed, image_id, "vqa", int(question["question_id"])))
        if self.keep is not None:
            self.keep(f"{image_id}/vqa/{question['question_id']}", heatmaps[methods[0]])
        return [{"kind": "answer", "batch": batch, "image_id": image_id, "question_id": question["question_id"],
                 "question": question["question"], "question_type": question.get("question_type", ""),
                 "method": name, "answer": result.answer, "truth": truth, "correct": result.answer == truth,
                 "model": scores[name], "center": center, "random": random} for name in methods]
