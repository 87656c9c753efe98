"""Idefics3 and SmolVLM (transformers): Idefics3ForConditionalGeneration and
SmolVLMForConditionalGeneration, captioning and generative VQA.

Geometry. The processor resizes the image so that its longest edge is ``size["longest_edge"]``
(aspect ratio kept), then to multiples of the tile size ``max_image_size["longest_edge"]`` (T), and
splits it (``do_image_splitting``) into a rows x cols grid of T x T tiles plus a global view: the
whole resized image squeezed to T x T. An image that fits one tile, or any image without
splitting (squeezed to T x T), is a single view. ``pixel_values`` is (B, views, C, T, T) (all-zero
views are padding, dropped by the model); the prompt expands ``<image>`` into
``<fake_token_around_image><row_r_col_c><image>*N`` per tile (rows of tiles ending in a newline) and
``<fake_token_around_image><global-img><image>*N<fake_token_around_image>`` for the global view. The
resize is measured with coordinate ramps (the tiles stitched back into the resized image) and
inverted; nothing is cut.

The vision model (SigLIP-style, no CLS) sees each view on its own (T/patch) x (T/patch) patch grid;
the connector's pixel shuffle folds each scale_factor x scale_factor block of patches into one
language-model token, raster order on the (T/patch/scale) grid. A layer's map: the tiles' grids
stitched into the rows x cols layout of the resized image, and the global view's grid repeated
(nearest) over the same cells; the two are put side by side as channels, so a CAM method's signed
map is the tiles' signed map plus the global view's (the word's evidence through both views the
language model reads; a mean would only halve it). The attention methods and TAM sum the two
views' maps alike (the attention methods' image columns span the views' separators, which they
leave out). Within one forward all images share a tile grid: images of different grids in one call
run one forward per grid (the chat VLM base's ``LayoutPerImage``, as Qwen2-VL's and LLaVA-NeXT's);
the tile grid of laid-out inputs is read from their ``<row_r_col_c>`` tokens. Guided Grad-CAM is
refused (its pixel gradients would be on the tiles, not on a (B, C, H, W) image).

Preset layer: the vision model's last encoder block: the connector reads its patch tokens after
the post-layernorm (per token, so the grid is the block's).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .chat_vlm import ChatVLM, LayoutPerImageCaptioner, LayoutPerImageVQA, side_by_side, stitch_tiles
from .common import register_adapter
from .geometry import AxisAligned, probe_geometry
from .hf import ProcessorGeometry, last_block_name

LAYER_REASON = ("the vision model's last encoder block: the connector reads its patch tokens (after the "
                "post-layernorm) and pixel-shuffles each scale_factor x scale_factor block into one token; "
                "its patch grid is the finest the model has")
Tiles = tuple[int, int]  # (rows, cols) of tiles; (1, 1): a single view (no tiles)
TILE_TOKEN = re.compile(r"<row_(\d+)_col_(\d+)>")


def resized_image(views: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """One image's views (views, C, T, T) -> the resized image (C, rows*T, cols*T) from its tiles
    (row by row, as the processor cuts them); rows = cols = 0 (no tiles): the single view."""
    if rows == 0 and cols == 0:
        return views[0]
    return stitch_tiles(views[:rows * cols].movedim(1, -1), rows, cols).movedim(-1, 0)


class TileGeometry(ProcessorGeometry):
    """The processor's views of one image (``pixels``: (views, C, T, T), images concatenated along
    the first dimension) and its resize, measured with coordinate ramps on the tiles stitched back
    together."""

    def pixels(self, image) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]}

    def geometry(self, size: tuple[int, int]) -> AxisAligned:
        if size not in self._cache:
            def process(array: np.ndarray) -> torch.Tensor:
                out = self.image_processor(images=array, do_rescale=False, do_normalize=False,
                                           return_row_col_info=True, return_tensors="pt")
                return resized_image(out["pixel_values"][0], int(out["rows"][0][0]), int(out["cols"][0][0])).float()

            self._cache[size] = probe_geometry(process, size)
        return self._cache[size]


class Idefics3Family(ChatVLM):
    """What Idefics3's and SmolVLM's captioner and answerer share: the tile geometry, the prompt
    laid out per tile grid, a layer's tokens per view stitched into the resized image."""

    layer_reason = LAYER_REASON
    geometry_class = TileGeometry
    pixel_input = "tiles and a global view (pixel_values (B, views, C, T, T))"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        self._tiles: Tiles | None = None  # the tile grid of the images being laid out or explained
        # the tokens that mark tile (r, c) in the prompt: how laid-out inputs say their tile grid
        self._tile_tokens = {index: (int(m[1]), int(m[2])) for token, index in tokenizer.get_vocab().items()
                             if (m := TILE_TOKEN.fullmatch(token))}
        super().__init__(model, tokenizer, image_processor, name, processor)

    # ------------------------------------------------------------------ the model
    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.base_model.vision_model

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.base_model.text_model

    @property
    def tile_size(self) -> int:
        """T: the side of a tile and of the global view (the image processor's ``max_image_size``,
        which the checkpoints set to the vision model's image size)."""
        size = getattr(self.processor.image_processor, "max_image_size", None)
        edge = size.get("longest_edge") if isinstance(size, Mapping) else getattr(size, "longest_edge", None)
        return int(edge or self.vlm.config.vision_config.image_size)

    @property
    def scale(self) -> int:
        return int(self.vlm.config.scale_factor)

    def preset_layer(self) -> str:
        return last_block_name(self.vlm, self.vision_tower)

    def _install_output_hooks(self) -> None:
        pixels = self.chat.image_processor(images=self.probe_image(), return_tensors="pt")["pixel_values"]
        with torch.no_grad(), self.forward_context():
            self.image_outputs(self.to_device({"pixel_values": pixels}))

    # ------------------------------------------------------------------ the images of a call
    def geometry_tiles(self, geometry: AxisAligned) -> Tiles:
        """The tile grid of the resized image a geometry maps back (its input size)."""
        height, width = geometry.input_size
        return height // self.tile_size, width // self.tile_size

    def input_tiles(self, input_ids: torch.Tensor) -> Tiles:
        """The tile grid laid-out ids were made for, read from their ``<row_r_col_c>`` tokens (none:
        a single view); the same in every row."""
        grids = set()
        for row in input_ids.tolist():
            marks = [self._tile_tokens[i] for i in row if i in self._tile_tokens]
            grids.add((max(r for r, _ in marks), max(c for _, c in marks)) if marks else (1, 1))
        if len(grids) != 1:
            raise ValueError(f"one forward explains images of one tile grid, got {sorted(grids)}")
        return grids.pop()

    @staticmethod
    def view_count(tiles: Tiles) -> int:
        rows, cols = tiles
        return 1 if rows * cols == 1 else rows * cols + 1

    def views_per_image(self) -> int:
        return self.view_count(self._current_tiles())

    @contextlib.contextmanager
    def images_of(self, tiles: Tiles) -> Iterator[None]:
        """For the duration: the images of one forward share the tile grid ``tiles``; the layout
        and the size of the resized image the maps are upsampled to. Restored after, also on errors."""
        with self.laid_out((tiles[0] * self.tile_size, tiles[1] * self.tile_size), _tiles=tiles):
            yield

    def _current_tiles(self) -> Tiles:
        if self._tiles is None:
            raise ValueError(f"{type(self.vlm).__name__}'s image tokens depend on the image: lay out and explain "
                             "captions through explain / explain_batch / prepare (they know the image)")
        return self._tiles

    # the images of a call, grouped by tile grid (``LayoutPerImage``)
    def layout_key(self, geometry: AxisAligned) -> Tiles:
        return self.geometry_tiles(geometry)

    def images_at(self, geometries: Sequence[AxisAligned]) -> contextlib.AbstractContextManager:
        tiles = {self.geometry_tiles(g) for g in geometries}
        if len(tiles) != 1:
            raise ValueError(f"one forward explains images of one tile grid, got {sorted(tiles)}")
        return self.images_of(tiles.pop())

    def images_in(self, inputs: Mapping[str, torch.Tensor],
                  layer: nn.Module | str | None = None) -> contextlib.AbstractContextManager:
        return self.images_of(self.input_tiles(inputs["input_ids"]))

    def split_pixels(self, pixel_values: torch.Tensor, geometries: Sequence[AxisAligned]) -> list[torch.Tensor]:
        """The views of several images (concatenated, as from preprocess), one (1, views, C, T, T) tensor per image."""
        counts = [self.view_count(self.geometry_tiles(g)) for g in geometries]
        if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(counts):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} given for images of {sum(counts)} "
                             f"views ({counts}): expected the views from preprocess, concatenated")
        return [views[None] for views in pixel_values.split(counts)]

    def pixel_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The views of the current images as the model reads them: (B, views, C, T, T) (the
        concatenated views from preprocess regrouped per image)."""
        views = self.views_per_image()
        if pixel_values.dim() == 4 and pixel_values.shape[0] % views == 0:
            pixel_values = pixel_values.reshape(-1, views, *pixel_values.shape[1:])
        if pixel_values.dim() != 5 or pixel_values.shape[1] != views:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} given for images of {views} views")
        return {"pixel_values": pixel_values}

    # ------------------------------------------------------------------ the grid of a layer
    def vision_grid(self) -> tuple[int, int]:
        """The patch grid of one view (T / patch_size per side)."""
        side = self.tile_size // int(self.vlm.config.vision_config.patch_size)
        return side, side

    def image_token_grid(self) -> tuple[int, int]:
        """The stitched grid of the image tokens in the language model's sequence."""
        rows, cols = self._current_tiles()
        side = self.vision_grid()[0] // self.scale
        return rows * side, cols * side

    def image_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, views * N) sequence positions of every view's image tokens (tiles, then the global view)."""
        expected = self.views_per_image() * (self.vision_grid()[0] // self.scale) ** 2
        counts = rows.sum(dim=1)
        if counts.numel() == 0 or bool((counts != expected).any()):
            raise ValueError(f"expected {expected} image tokens in every row ({self._tiles} tiles and the global "
                             f"view), found {counts.tolist()}")
        return torch.nonzero(rows)[:, 1].reshape(rows.shape[0], -1)

    def views_to_grid(self, views: torch.Tensor, side: int) -> torch.Tensor:
        """(..., B, views, side*side, C) tokens of each view in raster order -> (..., B, C', H, W):
        the tiles stitched (H = rows * side, W = cols * side) and the global view's grid repeated over
        the same cells, side by side as channels (C' = 2C); a single view: (..., B, C, side, side)."""
        rows, cols = self._current_tiles()
        grids = views.reshape(*views.shape[:-2], side, side, views.shape[-1])  # (..., B, V, s, s, C)
        whole = grids[..., -1, :, :, :]  # the global view (the last)
        if views.shape[-3] == 1:
            return whole.movedim(-1, -3)
        return side_by_side(whole, stitch_tiles(grids[..., :rows * cols, :, :, :], rows, cols), mode="repeat")

    def image_token_placement(self) -> Any:
        """The attention methods' and TAM's (..., views * N) values at the image tokens -> (..., H, W):
        the tiles' and the global view's summed per cell."""
        def place(values: torch.Tensor) -> torch.Tensor:
            side = self.vision_grid()[0] // self.scale
            views = values.reshape(*values.shape[:-1], -1, side * side, 1)
            return self.views_to_grid(views, side).sum(dim=-3)
        return place

    def _tokens_to_grid(self, tensor: torch.Tensor, lead: int) -> torch.Tensor:
        """(..., rows, N, C) tokens -> (..., B, C', H, W): the language model's hidden states at the
        image tokens, or a vision layer's (views of each image as rows) patch tokens or the
        connector's shuffled tokens, stitched by ``views_to_grid``."""
        patches = self.vision_grid()[0]
        views = self.views_per_image()
        count, batch = tensor.shape[lead], tensor.shape[lead - 1]
        if self._is_sequence(tensor, lead):
            picked = self.image_token_states(tensor, lead)  # (..., B, views * N, C)
            side = patches // self.scale
            return self.views_to_grid(picked.reshape(*picked.shape[:lead], views, side * side, -1), side)
        if batch % views == 0 and count in (patches ** 2, (patches // self.scale) ** 2):
            side = patches if count == patches ** 2 else patches // self.scale
            return self.views_to_grid(tensor.reshape(*tensor.shape[:lead - 1], batch // views, views, count, -1), side)
        length = "unknown" if self._image_rows is None else self._image_rows.shape[1]
        shuffled = patches // self.scale
        raise ValueError(f"a layer output of {batch} rows of {count} tokens is neither a vision layer's ({views} views "
                         f"per image of {patches}x{patches} patches, or {shuffled}x{shuffled} after the pixel "
                         f"shuffle) nor the language model's sequence ({length} tokens)")

    # ------------------------------------------------------------------ the prompt
    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's ids with the image tokens expanded for the current tile grid (laid out by
        the processor once per prompt and grid, with a probe of the resized image's size, which
        the processor splits into the same tiles)."""
        tiles = self._current_tiles()
        key = (text, tiles)
        if key not in self._prompt_cache:
            height, width = tiles[0] * self.tile_size, tiles[1] * self.tile_size
            ids = self.prompt_inputs(text, Image.new("RGB", (width, height), (128, 128, 128)))["input_ids"]
            if self.input_tiles(ids) != tiles:
                raise ValueError(f"the processor split a probe of {height}x{width} into {self.input_tiles(ids)} "
                                 f"tiles, not {tiles}")
            self.image_positions(ids == self.image_token_id)  # the probe gave the tile grid's views
            self._prompt_cache[key] = ids[0].tolist()
        return self._prompt_cache[key]


# ----------------------------------------------------------------------------- captioning and VQA
class Idefics3Captioner(Idefics3Family, LayoutPerImageCaptioner):
    """Captioning as the assistant's reply; one forward per tile grid."""


class Idefics3VQA(Idefics3Family, LayoutPerImageVQA):
    """Generative VQA: K answers as K rows over one encoded image (its views)."""


# ----------------------------------------------------------------------------- registration
@register_adapter("captioning", model_type="idefics3", model_class="Idefics3ForConditionalGeneration")
class Idefics3ChatCaptioner(Idefics3Captioner):
    family = "idefics3"


@register_adapter("vqa", model_type="idefics3", model_class="Idefics3ForConditionalGeneration")
class Idefics3ChatVQA(Idefics3VQA):
    family = "idefics3"


@register_adapter("captioning", model_type="smolvlm", model_class="SmolVLMForConditionalGeneration")
class SmolVLMCaptioner(Idefics3Captioner):
    family = "smolvlm"


@register_adapter("vqa", model_type="smolvlm", model_class="SmolVLMForConditionalGeneration")
class SmolVLMVQA(Idefics3VQA):
    family = "smolvlm"
