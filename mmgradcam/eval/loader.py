"""Decoding ahead of the model: a ``torch.utils.data.DataLoader`` over an eval run's batches.

Item k of ``BatchDataset`` is batch k decoded: its images read (a missing or unreadable one
becomes a ``Skip``, exactly as the loop listed it before), preprocessed for the captioner (pixels
and the geometry back to the image), and each image's annotation masks decoded once into a
``MaskSet`` (category, color, all-objects and question masks, each with its 15 px neighbourhood).
With ``workers`` > 0 this runs in worker processes while the model works on the batch before;
with 0 it runs in the main process (the tests' setting). What an item holds does not depend on
where it was made, so results are identical either way.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .coco import CocoData, Skip
from .scoring import MaskSet, image_masks

PREFETCH = 2  # batches each worker decodes ahead


def default_workers() -> int:
    """min(4, CPUs - 1): decoding keeps up without taking the model's cores (0 on one CPU)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


@dataclass
class DecodedImage:
    """One image of a batch, ready for the model and for scoring."""

    image_id: int
    size: tuple[int, int]  # (H, W) of the original image: maps and masks are at this size
    masks: MaskSet
    bad: list[Skip] = field(default_factory=list)  # its unusable annotations
    pixel_values: torch.Tensor | None = None  # (1, ...) the captioner's input (None: no captions)
    geometry: Any = None  # maps the captioner's input back to the image
    image: Any = None  # the PIL image, kept only when the image has questions (VQA reads it)
    # question n of the image -> MaskSet key of its objects' union (None: no usable mask)
    answer_keys: dict[int, Any] = field(default_factory=dict)


@dataclass
class DecodedBatch:
    index: int
    images: list[DecodedImage]
    skipped: list[Skip]  # images that could not be read, in batch order

    def pin_memory(self) -> "DecodedBatch":
        """Page-locked copies of the tensors (the DataLoader's pin_memory thread calls this)."""
        for image in self.images:
            image.masks = image.masks.pin_memory()
            if image.pixel_values is not None:
                image.pixel_values = image.pixel_values.pin_memory()
        return self

    def to(self, device: torch.device, non_blocking: bool = False) -> "DecodedBatch":
        for image in self.images:
            image.masks = image.masks.to(device, non_blocking=non_blocking)
            if image.pixel_values is not None:
                image.pixel_values = image.pixel_values.to(device, non_blocking=non_blocking)
        return self


class BatchDataset(Dataset):
    """Item k: batch k of the run decoded (``DecodedBatch``).

    ``preprocess(pil) -> (inputs, geometry)``: the captioner's preprocessing (None when no
    captions are explained). Under the "fork" start method (Linux) workers share it with the main
    process; under "spawn" it is pickled to each worker with the captioner it belongs to."""

    def __init__(self, data: CocoData, batches: Sequence[Sequence[int]],
                 preprocess: Callable[[Any], tuple[dict, Any]] | None = None,
                 questions: dict[int, list[dict]] | None = None):
        self.data = data
        self.batches = [list(b) for b in batches]
        self.preprocess = preprocess
        self.questions = questions or {}

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> DecodedBatch:
        from mmgradcam.tasks.geometry import load_image

        images, skipped = [], []
        for image_id in self.batches[k]:
            path = self.data.images[image_id]["path"]
            try:
                pil = load_image(path, what=f"image {image_id}")
            except (FileNotFoundError, ValueError, OSError) as error:
                skipped.append(Skip("image", image_id, str(error)))
                continue
            images.append(self._decode(image_id, pil))
        return DecodedBatch(k, images, skipped)

    def _decode(self, image_id: int, pil: Any) -> DecodedImage:
        size = (pil.height, pil.width)
        decoded = self.data.annotation_masks(image_id, *size)  # each annotation's mask decoded once
        masks, bad = image_masks(self.data, image_id, *size, decoded=decoded)
        questions = self.questions.get(image_id, [])
        answers, answer_keys = {}, {}
        for n, question in enumerate(questions):
            object_ids = question.get("object_ids") or []
            mask = self.data.object_mask(object_ids, image_id, *size, decoded=decoded) if object_ids else None
            if mask is not None:
                answers[n] = mask
            answer_keys[n] = ("answer", n) if mask is not None else None
        image = DecodedImage(image_id, size, MaskSet.build(masks, size, answers), bad,
                             image=pil if questions else None, answer_keys=answer_keys)
        if self.preprocess is not None:
            inputs, image.geometry = self.preprocess(pil)
            image.pixel_values = inputs["pixel_values"]
        return image


def _as_is(item: DecodedBatch) -> DecodedBatch:
    return item  # a module-level function: workers may need to pickle it


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """A forked worker's init: on Linux the kernel kills it (SIGKILL) as soon as the thread that
    made it (the one iterating the loader, the run's main thread) dies, so a run killed with
    ``kill -9`` leaves no decoder behind (DataLoader's own check of the parent runs only between
    items, and a worker blocked on a full queue never gets there). A parent already gone before this
    runs is caught by comparing its pid."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def decoded_batches(dataset: BatchDataset, order: Sequence[int], workers: int = 0,
                    pin_memory: bool = False) -> Iterator[DecodedBatch]:
    """Dataset items ``order[0], order[1], ...`` in that order, decoded by ``workers`` processes
    (``PREFETCH`` batches ahead each) or, with 0, in the calling process when asked for."""
    if workers < 0:
        raise ValueError(f"workers must be 0 (decode in the main process) or more, got {workers}")
    if not order:
        return iter(())
    # workers started by a forkserver or spawned are not the run's children: only forked ones die with it
    forked = workers > 0 and multiprocessing.get_start_method() == "fork"
    loader = DataLoader(dataset, batch_size=None, sampler=list(order), num_workers=workers, collate_fn=_as_is,
                        pin_memory=pin_memory, prefetch_factor=PREFETCH if workers > 0 else None,
                        worker_init_fn=partial(die_with_parent, os.getpid()) if forked else None)
    return iter(loader)
