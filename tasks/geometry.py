"""Image loading, preprocessing and its inversion, so maps come back at the original image size."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


def load_image(image: ImageLike, what: str = "image") -> Image.Image:
    """An RGB PIL image from a path, PIL image, (H, W[, C]) uint8/float array or (C, H, W) tensor.

    EXIF orientation is applied so maps line up with what a person sees.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
        try:
            with Image.open(path) as opened:
                opened.load()
                pil = ImageOps.exif_transpose(opened)
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{what}: {str(path)!r} is not a readable image ({error})") from None
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.dim() == 3 and array.shape[0] in (1, 3, 4):
            array = array.permute(1, 2, 0)
        return load_image(array.numpy(), what)
    elif isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise ValueError(f"{what}: expected an (H, W), (H, W, 3) or (H, W, 4) array, got {image.shape}")
        pil = Image.fromarray(array)
    else:
        raise TypeError(f"{what}: expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        background = Image.new("RGB", pil.size, (255, 255, 255))
        background.paste(pil.convert("RGBA"), mask=pil.convert("RGBA").split()[-1])
        return background
    if pil.mode == "I;16" or pil.mode == "I":
        array = np.asarray(pil, dtype=np.float64)
        pil = Image.fromarray((255 * array / max(array.max(), 1)).astype(np.uint8))
    return pil.convert("RGB")


@dataclass(frozen=True)
class Letterbox:
    """Resize the longer side to ``size`` keeping the aspect ratio, pad the rest to a square.

    ``invert`` takes maps on the model's square input back to the original image: the padding is
    cut off and the content region resized to (H, W). Every original pixel is seen.
    """

    original_size: tuple[int, int]  # (H, W)
    size: int

    @property
    def content(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the image inside the square model input."""
        h, w = self.original_size
        scale = self.size / max(h, w)
        ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
        return (self.size - ch) // 2, (self.size - cw) // 2, ch, cw

    def apply(self, image: Image.Image, fill: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
        top, left, ch, cw = self.content
        canvas = Image.new("RGB", (self.size, self.size), fill)
        canvas.paste(image.resize((cw, ch), Image.Resampling.BILINEAR), (left, top))
        return canvas

    def invert(self, maps: torch.Tensor) -> torch.Tensor:
        """(..., size, size) maps on the model input -> (..., H, W) on the original image."""
        top, left, ch, cw = self.content
        crop = maps[..., top:top + ch, left:left + cw]
        lead = crop.shape[:-2]
        resized = F.interpolate(crop.reshape(-1, 1, ch, cw).float(), size=self.original_size,
                                mode="bilinear", align_corners=False)
        return resized.reshape(*lead, *self.original_size)

    def seen(self) -> torch.Tensor:
        """(H, W) bool: which original pixels the model saw (all of them for a letterbox)."""
        return torch.ones(self.original_size, dtype=torch.bool)


def to_tensor(image: Image.Image, mean: float = 0.5, std: float = 0.25) -> torch.Tensor:
    """(1, 3, H, W) float tensor normalized with one mean/std for all channels."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((array - mean) / std).unsqueeze(0)
