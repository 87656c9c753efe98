"""LLaVA-NeXT and LLaVA-OneVision (transformers): LlavaNextForConditionalGeneration and
LlavaOnevisionForConditionalGeneration, captioning and generative VQA.

**Any-resolution input.** The processor picks the resolution of ``image_grid_pinpoints`` that fits
the image best (``select_best_resolution``), resizes the image into it keeping the aspect ratio,
pads it centered and cuts it into tiles of the vision tower's size; tile 0 (the base) is the whole
image resized to one tile (aspect ratio not kept): ``pixel_values`` (B, tiles, C, T, T) and
``image_sizes`` (B, 2). The model stitches the tiles' patch grids into one grid, cuts the padding
off (``unpad_image``, in patch cells), OneVision downsamples it (bilinear) when it holds more than
``anyres_max_N`` tiles' worth of cells, appends ``image_newline`` after every row and puts the base
tile's g x g grid first: base g*g + rows * (cols + 1) image tokens.

**One map per image, on the unpadded stitched grid.** A vision-tower layer's (B*tiles, [CLS +] g*g,
C) tokens: the tiles' grids stitched and cut exactly as the model's own ``unpad_image`` cuts them
(run on cell indices); a language-model layer: its hidden states at the image tokens, the tile grid
with the newline column dropped (OneVision: the downsampled grid). The base tile's grid is
upsampled (bilinear) to the same grid and the two views go side by side as channels (2C): every
CAM method weighs each view's channels by its own gradients, and the map is the sum of the two
views' signed maps -- the language model reads both views' tokens (a mean differs by a factor
only). The attention methods and TAM, per image token, likewise: tile grid plus upsampled base.

**Geometry.** The unpadded grid covers the resized image inside the padded canvas (up to the
cell rounding of ``unpad_image``): measured with coordinate ramps through the processor (tiles
stitched back, cut to the unpadded cells) and inverted, so maps return at the original image size;
a strip the rounding cuts off is marked unseen. The base view covers the whole image as well.

**One forward per layout.** The number of image tokens depends on the image size: the prompt is
laid out per layout (tile grid, unpadded grid), and images of different layouts in one
``explain_batch`` / ``explain_pixels`` / ``score_batch`` / ``generate_batch`` call run one forward
per layout (images of the same layout share one). Pixel-space methods (Guided Grad-CAM) are
refused: the pixel input is tiles, not one image.

Preset layer: the vision tower's block at ``vision_feature_layer``, as for LLaVA-1.5 (shared
``LlavaFamily.preset_layer``): NeXT -2 (CLIP, CLS dropped), OneVision -1 (SigLIP, no CLS).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .chat_vlm import (MAX_PREFIX_TOKENS, LayoutPerImageCaptioner, LayoutPerImageVQA, side_by_side, stitch_tiles,
                       summed_views)
from .common import register_adapter
from .geometry import AxisAligned, probe_geometry
from .hf import ProcessorGeometry
from .llava import LlavaFamily

LAYER_REASON = ("the vision tower's block at vision_feature_layer (NeXT -2, OneVision -1): the projector reads its "
                "patch tokens of every tile; maps on the stitched, unpadded tile grid plus the base image")


@dataclass(frozen=True)
class AnyResGrid:
    """Where an image's tokens go (the same for every image size with this layout)."""

    tiles: tuple[int, int]  # high-resolution tiles (rows, cols) of the padded canvas
    cells: int  # g: patch cells per tile side (the base tile's grid is g x g)
    crop: tuple[int, int, int, int]  # (top, rows, left, cols): the unpadded cells of the stitched grid
    packed: tuple[int, int]  # the tile grid in the language model's sequence (OneVision may downsample)
    cell_pixels: int  # tile pixels per cell (the patch size)

    @property
    def tile_count(self) -> int:
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def grid(self) -> tuple[int, int]:
        return self.crop[1], self.crop[3]

    @property
    def image_tokens(self) -> int:
        return self.cells ** 2 + self.packed[0] * (self.packed[1] + 1)

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) pixels of the canvas the unpadded grid covers."""
        return self.crop[1] * self.cell_pixels, self.crop[3] * self.cell_pixels


class AnyResGeometry(ProcessorGeometry):
    """The processor's tiles, padded to the most tiles any image gets (so images of any size
    concatenate), with ``image_sizes``; the geometry of the unpadded grid's region of the canvas,
    measured with coordinate ramps (tiles stitched back, cut to the unpadded cells)."""

    def __init__(self, image_processor: Any, grid_of: Any, max_tiles: int):
        super().__init__(image_processor)
        self.grid_of = grid_of  # (H, W) -> AnyResGrid, from the model's own functions
        self.max_tiles = max_tiles

    def pixels(self, image: Any) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=image, return_tensors="pt")
        pixels = out["pixel_values"]
        if pixels.shape[1] > self.max_tiles:
            raise ValueError(f"the image processor made {pixels.shape[1]} tiles, more than the model's "
                             f"image_grid_pinpoints allow ({self.max_tiles}): give both the same pinpoints")
        pixels = F.pad(pixels, (0, 0, 0, 0, 0, 0, 0, self.max_tiles - pixels.shape[1]))
        return {"pixel_values": pixels, "image_sizes": out["image_sizes"]}

    def geometry(self, size: tuple[int, int]) -> AxisAligned:
        size = (int(size[0]), int(size[1]))
        if size not in self._cache:
            grid = self.grid_of(size)

            def process(array: np.ndarray) -> torch.Tensor:
                out = self.image_processor(images=array, do_rescale=False, do_normalize=False, return_tensors="pt")
                tiles = out["pixel_values"][0, 1:grid.tile_count].float()
                canvas = stitch_tiles(tiles.movedim(1, -1), *grid.tiles).movedim(-1, 0)
                top, height, left, width = grid.crop
                p = grid.cell_pixels
                return canvas[:, top * p:(top + height) * p, left * p:(left + width) * p]

            self._cache[size] = probe_geometry(process, size)
        return self._cache[size]


class AnyResFamily(LlavaFamily):
    """What LLaVA-NeXT's and LLaVA-OneVision's captioner and answerer share: the any-resolution
    layout of an image size, the prompt laid out per layout, the tiles stitched into one grid."""

    layer_reason = LAYER_REASON
    pixel_input = "any-resolution tiles (pixel_values (B, tiles, C, H, W))"
    image_input_keys = ("pixel_values", "image_sizes")

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        self._grids: dict[tuple[int, int], AnyResGrid] = {}
        self._size: tuple[int, int] | None = None  # an image size of the layout being explained
        super().__init__(model, tokenizer, image_processor, name, processor)

    @property
    def geometry_class(self) -> Any:
        return partial(AnyResGeometry, grid_of=self.anyres_grid, max_tiles=self.max_tiles())

    # ------------------------------------------------------------------ the layout of an image size
    @property
    def tile_size(self) -> int:
        return int(self.vlm.config.vision_config.image_size)

    def max_tiles(self) -> int:
        side = self.tile_size
        return 1 + max(math.ceil(h / side) * math.ceil(w / side) for h, w in self.vlm.config.image_grid_pinpoints)

    def anyres_grid(self, size: Sequence[int]) -> AnyResGrid:
        """The layout of an image of ``size`` (H, W), from the model's own functions
        (``get_anyres_image_grid_shape``, ``unpad_image`` run on cell indices)."""
        key = (int(size[0]), int(size[1]))
        if key not in self._grids:
            config = self.vlm.config
            module = inspect.getmodule(type(self.vlm))
            tile, patch = self.tile_size, int(config.vision_config.patch_size)
            g = tile // patch
            rows, cols = module.get_anyres_image_grid_shape(list(key), config.image_grid_pinpoints, tile)
            cells = torch.arange(rows * g * cols * g, device="cpu").reshape(1, rows * g, cols * g)  # bookkeeping
            kept = module.unpad_image(cells, list(key))
            top, left = divmod(int(kept[0, 0, 0]), cols * g)
            height, width = kept.shape[1:]
            self._grids[key] = AnyResGrid((int(rows), int(cols)), g, (top, height, left, width),
                                          self.packed_grid(height, width, g), patch)
        return self._grids[key]

    def packed_grid(self, height: int, width: int, cells: int) -> tuple[int, int]:
        """The unpadded tile grid as the language model's sequence holds it (NeXT: as it is)."""
        return height, width

    def size_key(self, size: Sequence[int]) -> Hashable:
        """Equal for image sizes the model lays out alike (tiles, unpadded cells, sequence grid)."""
        grid = self.anyres_grid(size)
        return grid.tiles, grid.crop, grid.packed

    @contextlib.contextmanager
    def images_of(self, sizes: Sequence[Sequence[int]] | torch.Tensor) -> Iterator[None]:
        """For the duration: the images of one forward (their (H, W) sizes, all of one layout), the
        layout's layer options (maps upsampled to the unpadded canvas). Restored after, also on errors."""
        rows = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
        keys = {self.size_key(s) for s in rows}
        if len(keys) != 1:
            raise ValueError(f"one forward explains images of one any-resolution layout, got sizes {rows}")
        size = tuple(int(v) for v in rows[0])
        with self.laid_out(self.anyres_grid(size).input_size, _size=size):
            yield

    def current_grid(self) -> AnyResGrid:
        if self._size is None:
            raise ValueError(f"{type(self.vlm).__name__}'s image tokens depend on the image size: lay out and "
                             "explain through explain / explain_batch / prepare (they know the image)")
        return self.anyres_grid(self._size)

    # the images of a call, grouped by layout (``LayoutPerImage``); a geometry knows its image's size
    def layout_key(self, geometry: AxisAligned) -> Hashable:
        return self.size_key(geometry.original_size)

    def images_at(self, geometries: Sequence[AxisAligned]) -> contextlib.AbstractContextManager:
        return self.images_of([g.original_size for g in geometries])

    def images_in(self, inputs: Mapping[str, torch.Tensor],
                  layer: nn.Module | str | None = None) -> contextlib.AbstractContextManager:
        return self.images_of(inputs["image_sizes"])

    def split_pixels(self, pixel_values: torch.Tensor, geometries: Sequence[AxisAligned]) -> list[torch.Tensor]:
        """One (1, tiles, C, T, T) tensor per image (preprocess pads every image to the same tiles)."""
        if len(pixel_values) != len(geometries):
            raise ValueError(f"{len(pixel_values)} images' tiles given with {len(geometries)} geometries")
        return list(pixel_values.split(1))

    def prompt_inputs(self, text: str, image: Image.Image) -> dict[str, torch.Tensor]:
        inputs = super().prompt_inputs(text, image)
        inputs.pop("batch_num_images", None)  # one image per row (OneVision's processor says so)
        return inputs

    def vision_grid(self) -> tuple[int, int]:
        return self.current_grid().grid

    def image_token_grid(self) -> tuple[int, int]:
        return self.current_grid().packed

    def pixel_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tiles and ``image_sizes``: any size of the layout gives the model the same tiles,
        unpadding and tokens."""
        sizes = torch.tensor([self._size_of_layout()] * len(pixel_values), dtype=torch.long, device=self.device)
        return {"pixel_values": pixel_values, "image_sizes": sizes}

    def _size_of_layout(self) -> tuple[int, int]:
        self.current_grid()  # refuses outside a layout
        return self._size

    # ------------------------------------------------------------------ tokens -> the image's grid
    def image_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, n) positions of all the image tokens (base, tile rows, newlines) in each row."""
        count = self.current_grid().image_tokens
        found = rows.sum(dim=1)
        if found.numel() == 0 or bool((found != count).any()):
            raise ValueError(f"expected {count} image tokens in every row (this image size's layout), found "
                             f"{found.tolist()}")
        return torch.nonzero(rows)[:, 1].reshape(rows.shape[0], count)

    def packed_views(self, picked: torch.Tensor, lead: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., n image tokens, C) in the sequence's order -> the base grid (..., g, g, C) and the
        tile grid (..., h, w, C), the newline after each row dropped."""
        grid = self.current_grid()
        g, (h, w) = grid.cells, grid.packed
        shape, channels = picked.shape[:lead], picked.shape[-1]
        base = picked[..., :g * g, :].reshape(*shape, g, g, channels)
        tiles = picked[..., g * g:, :].reshape(*shape, h, w + 1, channels)[..., :w, :]
        return base, tiles

    def tower_views(self, tensor: torch.Tensor, lead: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A vision layer's (..., images * tiles, [prefix +] g*g, C) -> the base grid (..., images,
        g, g, C) and the stitched tile grid cut to its unpadded cells (..., images, h, w, C)."""
        grid = self.current_grid()
        g, (rows, cols) = grid.cells, grid.tiles
        count, tokens, channels = tensor.shape[lead - 1], tensor.shape[lead], tensor.shape[-1]
        prefix = tokens - g * g
        if count % grid.tile_count or not 0 <= prefix <= MAX_PREFIX_TOKENS:
            raise ValueError(f"a layer output of {count} x {tokens} tokens is neither the vision tower's tiles "
                             f"({grid.tile_count} per image, {g}x{g} patches after up to {MAX_PREFIX_TOKENS} prefix "
                             "tokens) nor the language model's sequence")
        outer = tensor.shape[:lead - 1]
        per_image = tensor[..., prefix:, :].reshape(*outer, count // grid.tile_count, grid.tile_count, g, g, channels)
        base = per_image[..., 0, :, :, :]
        stitched = stitch_tiles(per_image[..., 1:, :, :, :], rows, cols)
        top, height, left, width = grid.crop
        return base, stitched[..., top:top + height, left:left + width, :]

    def views_per_image(self) -> int:
        """A vision layer's first dimension holds each image's tiles (base and high-resolution)."""
        return self.current_grid().tile_count

    def _tokens_to_grid(self, tensor: torch.Tensor, lead: int) -> torch.Tensor:
        """(..., B, N, C) -> (..., B, 2C, h, w): the tile view's channels, then the base view's
        upsampled to the same grid (a vision layer: the unpadded stitched grid; a language-model
        layer: its hidden states at the image tokens, on the sequence's tile grid)."""
        if self._is_sequence(tensor, lead):
            return side_by_side(*self.packed_views(self.image_token_states(tensor, lead), lead))
        return side_by_side(*self.tower_views(tensor, lead))

    def image_token_placement(self) -> Any:
        """The attention methods' and TAM's (..., n image tokens) -> (..., h, w): tile grid plus upsampled base."""
        def place(values: torch.Tensor) -> torch.Tensor:
            base, tiles = self.packed_views(values[..., None], values.dim() - 1)
            return summed_views(base, tiles)[..., 0, :, :]
        return place

    # ------------------------------------------------------------------ the prompt
    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's ids with the image tokens expanded for the current layout (laid out by the
        processor once per prompt and layout, with an image of the layout's size)."""
        grid = self.current_grid()
        key = (text, self.size_key(self._size))
        if key not in self._prompt_cache:
            probe = Image.new("RGB", (self._size[1], self._size[0]), (128, 128, 128))
            ids = self.prompt_inputs(text, probe)["input_ids"][0]
            if int((ids == self.image_token_id).sum()) != grid.image_tokens:
                raise ValueError(f"the processor laid out {int((ids == self.image_token_id).sum())} image tokens for "
                                 f"an image of {self._size}; the model expects {grid.image_tokens}")
            self._prompt_cache[key] = ids.tolist()
        return self._prompt_cache[key]


# ----------------------------------------------------------------------------- captioning
class AnyResCaptioner(AnyResFamily, LayoutPerImageCaptioner):
    """Captioning as the assistant's reply; one forward per any-resolution layout (TAM: the LM
    head's logits at the image tokens placed as the attention methods' are)."""


# ----------------------------------------------------------------------------- VQA
class AnyResVQA(AnyResFamily, LayoutPerImageVQA):
    """Generative VQA: K answers as K rows over one encoded image."""


# ----------------------------------------------------------------------------- registration
class OnevisionGrid:
    """LLaVA-OneVision: the unpadded tile grid is downsampled (bilinear) when it holds more than
    ``anyres_max_N`` tiles' worth of cells (the model's ``pack_image_features``)."""

    family = "llava-onevision"

    def packed_grid(self, height: int, width: int, cells: int) -> tuple[int, int]:
        aspect = str(getattr(self.vlm.config, "vision_aspect_ratio", None) or "anyres_max_9")
        most = int(aspect.removeprefix("anyres_max_"))
        ratio = math.sqrt(height * width / (most * cells ** 2))
        return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)


@register_adapter("captioning", model_type="llava_next", model_class="LlavaNextForConditionalGeneration")
class LlavaNextCaptioner(AnyResCaptioner):
    family = "llava-next"


@register_adapter("vqa", model_type="llava_next", model_class="LlavaNextForConditionalGeneration")
class LlavaNextVQA(AnyResVQA):
    family = "llava-next"


@register_adapter("captioning", model_type="llava_onevision", model_class="LlavaOnevisionForConditionalGeneration")
class LlavaOnevisionCaptioner(OnevisionGrid, AnyResCaptioner):
    pass


@register_adapter("vqa", model_type="llava_onevision", model_class="LlavaOnevisionForConditionalGeneration")
class LlavaOnevisionVQA(OnevisionGrid, AnyResVQA):
    pass
