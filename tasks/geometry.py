"""Image loading, preprocessing and its inversion, so maps come back at the original image size."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


MAX_SIDE = 4096  # larger images are decoded reduced (maps are then at this size, with a warning)


def _open_reduced(path: Path) -> Image.Image:
    """Open an image file, decoding very large ones at a reduced size to bound memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(path)
        opened.info["original_size"] = opened.size
        if max(opened.size) > MAX_SIDE:
            if opened.format == "JPEG":
                opened.draft("RGB", (MAX_SIDE, MAX_SIDE))  # decode at 1/2, 1/4 or 1/8 scale
            opened.load()
            if max(opened.size) > MAX_SIDE:
                factor = int(np.ceil(max(opened.size) / MAX_SIDE))
                opened = opened.reduce(factor)
        else:
            opened.load()
        return opened


def load_image(image: ImageLike, what: str = "image") -> Image.Image:
    """An RGB PIL image from a path, PIL image, (H, W[, C]) uint8/float array or (C, H, W) tensor.

    EXIF orientation is applied so maps line up with what a person sees; transparency is
    composited on white; 16-bit, palette, grayscale and CMYK images are converted to RGB; images
    larger than MAX_SIDE are decoded reduced (with a warning: maps are then at the reduced size).
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
        try:
            opened = _open_reduced(path)
            original = opened.info.get("original_size", opened.size)
            pil = ImageOps.exif_transpose(opened)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"{what}: {str(path)!r} is not a readable image ({error})") from None
        if pil.size != original and sorted(pil.size) != sorted(original):
            warnings.warn(f"{what}: {original[0]}x{original[1]} pixels decoded at {pil.width}x{pil.height} to "
                          "bound memory; maps are at that size", stacklevel=2)
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.dim() == 3 and array.shape[0] in (1, 3, 4):
            array = array.permute(1, 2, 0)
        return load_image(array.numpy(), what)
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or 0 in array.shape:
            raise ValueError(f"{what}: expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {image.shape}")
        if array.dtype != np.uint8:
            array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        pil = Image.fromarray(array)
    else:
        raise TypeError(f"{what}: expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")
    if pil.width < 1 or pil.height < 1:
        raise ValueError(f"{what}: the image is empty ({pil.width}x{pil.height})")
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        background = Image.new("RGB", pil.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    if pil.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(pil, dtype=np.float64)
        top = array.max()
        pil = Image.fromarray((255 * array / top if top > 0 else array).astype(np.uint8))
    return pil.convert("RGB")


@dataclass(frozen=True)
class AxisAligned:
    """A preprocessing that scales and shifts each axis (resize, crop, pad, letterbox).

    A model-input pixel at continuous coordinate p (pixel centers at i + 0.5) shows the original
    image at ``scale * p + offset`` (per axis: y, x). ``invert`` samples maps on the model input at
    every original pixel; original pixels the model never saw (outside a center crop) get 0 and
    are False in ``seen()`` -- nothing is stretched over them.
    """

    original_size: tuple[int, int]  # (H, W)
    input_size: tuple[int, int]  # (h, w) of the model input
    scale: tuple[float, float]
    offset: tuple[float, float]
    valid_size: tuple[int, int] | None = None  # model-input region holding image (not padding)

    def _input_coordinates(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Model-input coordinates of every original pixel center, per axis."""
        ys = (torch.arange(self.original_size[0], dtype=torch.float64, device=device) + 0.5 - self.offset[0]) \
            / self.scale[0]
        xs = (torch.arange(self.original_size[1], dtype=torch.float64, device=device) + 0.5 - self.offset[1]) \
            / self.scale[1]
        return ys, xs

    def invert(self, maps: torch.Tensor) -> torch.Tensor:
        """(..., h, w) maps on the model input -> (..., H, W) on the original image."""
        h, w = maps.shape[-2:]
        if (h, w) != tuple(self.input_size):
            maps = F.interpolate(maps.reshape(-1, 1, h, w).float(), size=tuple(self.input_size), mode="bilinear",
                                 align_corners=False).reshape(*maps.shape[:-2], *self.input_size)
        ys, xs = self._input_coordinates(maps.device)
        grid_y = (2 * ys / self.input_size[0] - 1).float()
        grid_x = (2 * xs / self.input_size[1] - 1).float()
        grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)[None]
        lead = maps.shape[:-2]
        flat = maps.reshape(-1, 1, *self.input_size).float()
        sampled = F.grid_sample(flat, grid.expand(flat.shape[0], -1, -1, -1), mode="bilinear",
                                padding_mode="border", align_corners=False)
        out = sampled.reshape(*lead, *self.original_size)
        return out * self.seen(out.device).to(out.dtype)

    def seen(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(H, W) bool: the original pixels that fall inside the model input's image region."""
        ys, xs = self._input_coordinates(device)
        limit_y, limit_x = self.valid_size or self.input_size
        inside_y = (ys >= 0) & (ys <= limit_y)
        inside_x = (xs >= 0) & (xs <= limit_x)
        return inside_y[:, None] & inside_x[None, :]


class Letterbox(AxisAligned):
    """Resize the longer side to ``size`` keeping the aspect ratio and pad the rest to a square
    (the default models' preprocessing). Every original pixel is seen."""

    def __init__(self, original_size: tuple[int, int], size: int):
        h, w = original_size
        factor = size / max(h, w)
        ch, cw = max(1, round(h * factor)), max(1, round(w * factor))
        top, left = (size - ch) // 2, (size - cw) // 2
        sy, sx = h / ch, w / cw
        super().__init__((h, w), (size, size), (sy, sx), (-top * sy, -left * sx))
        object.__setattr__(self, "content", (top, left, ch, cw))

    def apply(self, image: Image.Image, fill: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
        top, left, ch, cw = self.content
        canvas = Image.new("RGB", (self.input_size[1], self.input_size[0]), fill)
        canvas.paste(image.resize((cw, ch), Image.Resampling.BILINEAR), (left, top))
        return canvas


def probe_geometry(process, original_size: tuple[int, int]) -> AxisAligned:
    """Measure an image processor's resize/crop/pad by passing coordinate ramps through it.

    ``process(array)`` takes an (H, W, 3) float array and returns the (3, h, w) float tensor the
    processor makes of it with rescaling and normalization off (plus, optionally, a (h, w) valid
    mask). Channel 0 carries each pixel's x, channel 1 its y, channel 2 ones (zero where padded).
    """
    h, w = original_size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = np.stack([xs + 0.5, ys + 0.5, np.ones_like(xs)], axis=-1)
    return measure_ramps(process(ramp), original_size)


def measure_ramps(processed: torch.Tensor, original_size: tuple[int, int]) -> AxisAligned:
    """The geometry of ``probe_geometry``'s coordinate ramps as a processor made them: (3, h, w),
    the image anywhere inside (padding, zero in channel 2, may lie on any side, e.g. a centered pad)."""
    h, w = original_size
    inside = processed[2] > 0.5
    rows = torch.nonzero(inside.any(dim=1)).flatten()
    cols = torch.nonzero(inside.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("the processed image holds none of the image (all padding)")
    start = (int(rows.min()), int(cols.min()))
    valid = (int(rows.max()) + 1, int(cols.max()) + 1)

    def fit(values: torch.Tensor, first: int) -> tuple[float, float]:
        n = values.shape[0]
        interior = slice(max(1, n // 10), max(2, n - n // 10))  # borders are clamped by the resampling
        p = torch.arange(first, first + n, dtype=torch.float64, device=values.device)[interior] + 0.5
        v = values.double()[interior]
        slope = float(((p - p.mean()) * (v - v.mean())).sum() / ((p - p.mean()) ** 2).sum())
        return slope, float(v.mean() - slope * p.mean())

    sx, ox = fit(processed[0, int(rows[len(rows) // 2]), start[1]:valid[1]], start[1])
    sy, oy = fit(processed[1, start[0]:valid[0], int(cols[len(cols) // 2])], start[0])
    padded = valid != tuple(processed.shape[1:])
    return AxisAligned((h, w), tuple(processed.shape[1:]), (sy, sx), (oy, ox), valid if padded else None)


def to_tensor(image: Image.Image, mean: float = 0.5, std: float = 0.25) -> torch.Tensor:
    """(1, 3, H, W) float tensor normalized with one mean/std for all channels."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((array - mean) / std).unsqueeze(0)
