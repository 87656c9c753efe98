"""What the default models know: the shapes world.

Two checks live here because both are about that world, not about any model:

- ``domain_check(image)``: does an image look like the shapes world (1-4 flat shapes in the five
  palette colors on a smooth, grayish, noisy background)? The default models have seen nothing
  else, so on a photograph their words and maps say little; ``domain_notice`` turns a failed check
  into the short note the adapters attach to their results (``r.notice``).
- ``shape_word_peaks(words, maps, objects)``: does each shape noun's map peak inside an object of
  that shape? The demo prints it; scripts/demo_seeds.py counts it over the demo seeds.

The image check is three pixel statistics with thresholds calibrated by
scripts/calibrate_domain.py (numbers in README, "Out-of-domain notice"): deterministic, a few
milliseconds, no model.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from mmgradcam.data.shapes import COLORS, PLURALS, ShapeObject

from .geometry import ImageLike, load_image

# Statistics are taken at the shapes world's own resolution: a larger image is box-averaged down,
# so a shapes image saved at 300 px reads like the 128 px original.
CHECK_SIDE = 128
# A 3x3 mean first: the background's pixel noise (sigma up to ~13 per channel) would otherwise
# look like color and like edges; averaging cuts it to ~4 and leaves flat shapes flat.
SMOOTHING = 3

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
# chroma of each palette color: the color minus its own gray level
PALETTE_CHROMA = PALETTE - PALETTE.mean(axis=1, keepdims=True)
# per-object color jitter (+-12 per channel), shading and noise stay well inside this distance
PALETTE_DISTANCE = 45.0
# the background's tint (+-15 per channel) and leftover noise stay below this chroma
GRAY_CHROMA = 30.0
# an object's anti-aliased edge mixes its color with the gray behind it: such a pixel lies near the
# segment from gray (chroma 0) to the palette color's chroma (1.15: jitter may saturate it a bit)
BLEND_DISTANCE = 22.0
BLEND_REACH = 1.15
# gray-level change per pixel (Sobel / 8) that counts as an edge; on the smoothed background
# (noise, stripes, soft blobs) 99.9% of pixels stay below 9.5 in the calibration images
EDGE_STRENGTH = 12.0
# an edge within this many pixels of a colored pixel (chroma above OBJECT_CHROMA) is an object's edge
OBJECT_REACH = 3
OBJECT_CHROMA = 40.0

# Calibrated thresholds (scripts/calibrate_domain.py): the worst of 600 val images, each in PNG,
# JPEG (quality 75), 300 px and padded non-square versions, against the scikit-image pictures
# (24 of 24 detected; where one statistic alone flags a picture, it is at least twice its threshold).
MIN_PALETTE_SHARE = 0.002  # shapes world >= 0.005 (padded to non-square; the smallest object is ~1%)
MAX_OTHER_SHARE = 0.02  # shapes world <= 0.007 (JPEG ringing at overlapping edges); retina 0.047
MAX_GRAY_EDGE_SHARE = 0.002  # shapes world <= 0.0001; microaneurysms 0.0046, clock 0.0081

# the generator seed of ``mmgradcam demo`` images: demo --seed N draws make_image(N, seed=DEMO_SEED)
DEMO_SEED = 20_251_121

EXAMPLE_MODELS = {"captioning": "Salesforce/blip-image-captioning-base", "vqa": "dandelin/vilt-b32-finetuned-vqa"}


@dataclass(frozen=True)
class DomainCheck:
    """Shares of an image's pixels (after downsampling and smoothing) that tell the shapes world
    apart: ``palette`` near a palette color (the objects), ``other`` neither grayish nor a
    palette color or its blend with gray, ``gray_edge`` on an edge far from any colored pixel."""

    palette: float
    other: float
    gray_edge: float

    @property
    def reasons(self) -> list[str]:
        """Why the image is not the shapes world (empty: it looks like it)."""
        found = []
        if self.palette < MIN_PALETTE_SHARE:
            found.append("no shape in the five palette colors")
        if self.other > MAX_OTHER_SHARE:
            found.append("colors outside the palette")
        if self.gray_edge > MAX_GRAY_EDGE_SHARE:
            found.append("edges and texture beyond flat shapes")
        return found

    @property
    def in_domain(self) -> bool:
        return not self.reasons


def _smoothed(image: ImageLike) -> np.ndarray:
    """(h, w, 3) float32 pixels: the image box-averaged to at most CHECK_SIDE, then smoothed."""
    pil = load_image(image)
    scale = CHECK_SIDE / max(pil.size)
    if scale < 1:
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.Resampling.BOX)
    pixels = np.asarray(pil, dtype=np.float32)
    return ndimage.uniform_filter(pixels, size=(SMOOTHING, SMOOTHING, 1), mode="nearest")


def _blend_distance(chroma: np.ndarray) -> np.ndarray:
    """(N,) squared distance of each chroma vector (N, 3) to the nearest gray-to-palette segment."""
    projection = chroma @ PALETTE_CHROMA.T  # (N, 5)
    length = (PALETTE_CHROMA**2).sum(axis=1)
    along = np.clip(projection / length, 0.0, BLEND_REACH)
    squared = (chroma**2).sum(axis=1, keepdims=True) - 2 * along * projection + along**2 * length
    return squared.min(axis=1)


def _gray_edge_share(pixels: np.ndarray, chroma_norm: np.ndarray) -> float:
    """Share of pixels on a strong gray-level edge with no colored pixel nearby: the shapes
    world's background is smooth, so its only edges are the shapes' outlines."""
    gray_level = pixels.mean(axis=2)
    strength = np.hypot(ndimage.sobel(gray_level, 0), ndimage.sobel(gray_level, 1)) / 8.0
    near_object = ndimage.maximum_filter(chroma_norm, size=2 * OBJECT_REACH + 1) > OBJECT_CHROMA
    return float(((strength > EDGE_STRENGTH) & ~near_object).mean())


def domain_check(image: ImageLike) -> DomainCheck:
    """The three statistics of ``image`` (a path, PIL image, array or tensor)."""
    pixels = _smoothed(image)
    flat = pixels.reshape(-1, 3)
    chroma = flat - flat.mean(axis=1, keepdims=True)
    chroma_norm = np.sqrt((chroma**2).sum(axis=1))
    explained = (chroma_norm < GRAY_CHROMA) | (_blend_distance(chroma) < BLEND_DISTANCE**2)
    # squared distances to the palette colors without an (N, 5, 3) temporary
    to_palette = (flat**2).sum(axis=1, keepdims=True) - 2 * flat @ PALETTE.T + (PALETTE**2).sum(axis=1)
    near_palette = to_palette.min(axis=1) < PALETTE_DISTANCE**2
    return DomainCheck(palette=float(near_palette.mean()), other=float((~explained).mean()),
                       gray_edge=_gray_edge_share(pixels, chroma_norm.reshape(pixels.shape[:2])))


def domain_notice(image: ImageLike, task: str = "captioning") -> str | None:
    """A short note when ``image`` does not look like the shapes world; None when it does."""
    reasons = domain_check(image).reasons
    if not reasons:
        return None
    what = "captioner" if task == "captioning" else "VQA model"
    example = EXAMPLE_MODELS.get(task, EXAMPLE_MODELS["captioning"])
    return (f"this image does not look like the shapes world ({'; '.join(reasons)}), the only world the "
            f"default {what} knows: its output and maps say little here. To explain a real model, pass "
            f"--model <Hugging Face id or save_pretrained directory>, e.g. --model {example}.")


# ----------------------------------------------------------------------------- demo check
@dataclass(frozen=True)
class WordPeak:
    """Where a shape noun's map peaks, and whether that pixel lies inside an object of its shape
    (``named`` is False when the image holds no such shape: the caption got it wrong)."""

    index: int
    word: str
    y: int
    x: int
    inside: bool
    named: bool


def _shape_of(word: str) -> str | None:
    for shape, plural in PLURALS.items():
        if word in (shape, plural):
            return shape
    return None


def shape_word_peaks(words: Sequence[str], maps: torch.Tensor, objects: Sequence[ShapeObject]) -> list[WordPeak]:
    """For every shape noun among ``words`` (maps (n_words, H, W) at the image's size, objects
    with their visible masks): the map's maximum and whether an object of that shape holds it."""
    peaks = []
    for j, word in enumerate(words):
        shape = _shape_of(word)
        if shape is None:
            continue
        y, x = divmod(int(maps[j].argmax()), int(maps[j].shape[-1]))
        matching = [o for o in objects if o.shape == shape]
        peaks.append(WordPeak(j, word, y, x, inside=any(bool(o.mask[y, x]) for o in matching),
                              named=bool(matching)))
    return peaks
