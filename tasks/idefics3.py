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
views' maps alike. Within one forward all images share a tile grid: images of different grids in
one call run one forward per grid (as Qwen2-VL's); Guided Grad-CAM is refused (its pixel gradients
would be on the tiles, not on a (B, C, H, W) image).

Preset layer: the vision model's last encoder block: the connector reads its patch tokens after
the post-layernorm (per token, so the grid is the block's).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmgradcam.engine import preserved_state
from mmgradcam.engine.attention import AttentionGraph
from mmgradcam.engine.explanation import Explanation
from mmgradcam.engine.layouts import FunctionLayout

from .captioning import CaptionTokens
from .chat_vlm import ChatCaptioner, ChatVLM, ChatVQA
from .common import register_adapter
from .geometry import AxisAligned, ImageLike, load_image, probe_geometry
from .hf import ProcessorGeometry, attention_modules, eager_attention, first_words, last_block_name

LAYER_REASON = ("the vision model's last encoder block: the connector reads its patch tokens (after the "
                "post-layernorm) and pixel-shuffles each scale_factor x scale_factor block into one token; "
                "its patch grid is the finest the model has")
Tiles = tuple[int, int]  # (rows, cols) of tiles; (1, 1): a single view (no tiles)


def group_indices(keys: Sequence[Tiles]) -> dict[Tiles, list[int]]:
    """The indices of ``keys`` grouped by tile grid, in order: one forward per group."""
    groups: dict[Tiles, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def stitch_tiles(views: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """One image's (views, C, T, T) -> the resized image (C, rows*T, cols*T) from its tiles (row
    by row, as the processor cuts them); rows = cols = 0 (no tiles): the single view."""
    if rows == 0 and cols == 0:
        return views[0]
    channels, size = views.shape[1], views.shape[-1]
    tiles = views[:rows * cols].reshape(rows, cols, channels, size, size)
    return tiles.permute(2, 0, 3, 1, 4).reshape(channels, rows * size, cols * size)


class TileGeometry(ProcessorGeometry):
    """The processor's views of one image (``pixels``: (views, C, T, T), images concatenated along
    the first dimension like Qwen2-VL's patches) and its resize, measured with coordinate ramps
    on the tiles stitched back together."""

    def pixels(self, image) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]}

    def geometry(self, size: tuple[int, int]) -> AxisAligned:
        if size not in self._cache:
            def process(array: np.ndarray) -> torch.Tensor:
                out = self.image_processor(images=array, do_rescale=False, do_normalize=False,
                                           return_row_col_info=True, return_tensors="pt")
                return stitch_tiles(out["pixel_values"][0], int(out["rows"][0][0]), int(out["cols"][0][0])).float()

            self._cache[size] = probe_geometry(process, size)
        return self._cache[size]


@dataclass
class TiledTokens(CaptionTokens):
    """A caption laid out after the prompt of an image split into ``tiles``."""

    tiles: Tiles = (0, 0)


class Idefics3Family(ChatVLM):
    """What Idefics3's and SmolVLM's captioner and answerer share: the tile geometry, the prompt
    laid out per tile grid, a layer's tokens per view stitched into the resized image."""

    layer_reason = LAYER_REASON
    geometry_class = TileGeometry
    pixel_input = "tiles and a global view (pixel_values (B, views, C, T, T))"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        # the images being laid out or explained: their tile grid, and a size of image the
        # processor splits into it (the prompt is laid out with a probe of that size)
        self._tiles: Tiles | None = None
        self._probe_size: tuple[int, int] | None = None
        super().__init__(model, tokenizer, image_processor, name, processor)
        self._layout_options = {"layout": FunctionLayout(self._tokens_to_grid, batch_size=self._samples)}
        self.layer_options = dict(self._layout_options)

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

    @staticmethod
    def view_count(tiles: Tiles) -> int:
        rows, cols = tiles
        return 1 if rows * cols == 1 else rows * cols + 1

    def split_views(self, pixel_values: torch.Tensor, tiles: Sequence[Tiles]) -> list[torch.Tensor]:
        """The concatenated views of several images, one (views, C, T, T) tensor per image."""
        counts = [self.view_count(t) for t in tiles]
        if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(counts):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} given for images of {sum(counts)} "
                             f"views ({list(tiles)} tiles): expected the views from preprocess, concatenated")
        return list(pixel_values.split(counts))

    @contextlib.contextmanager
    def tiles_of(self, geometry: AxisAligned) -> Iterator[None]:
        """For the duration: the images of one forward share ``geometry``'s tile grid; the layout,
        the prompt's probe size and the size of the resized image the maps are upsampled to.
        Restored after, also on errors."""
        saved = self._tiles, self._probe_size, self.layer_options
        self._tiles, self._probe_size = self.geometry_tiles(geometry), tuple(geometry.original_size)
        self.layer_options = {**self._layout_options, "input_size": tuple(geometry.input_size)}
        try:
            yield
        finally:
            self._tiles, self._probe_size, self.layer_options = saved

    def _current_tiles(self) -> Tiles:
        if self._tiles is None:
            raise ValueError(f"{type(self.vlm).__name__}'s image tokens depend on the image: lay out and explain "
                             "captions through explain / explain_batch / prepare (they know the image)")
        return self._tiles

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
        expected = self.view_count(self._current_tiles()) * (self.vision_grid()[0] // self.scale) ** 2
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
        whole = grids[..., -1, :, :, :].movedim(-1, -3)  # the global view (the last): (..., B, C, s, s)
        if views.shape[-3] == 1:
            return whole
        tiles = grids[..., :rows * cols, :, :, :].reshape(*grids.shape[:-4], rows, cols, side, side, grids.shape[-1])
        n = tiles.dim()
        stitched = tiles.permute(*range(n - 5), n - 1, n - 5, n - 3, n - 4, n - 2).reshape(
            *tiles.shape[:-5], tiles.shape[-1], rows * side, cols * side)
        spread = whole.repeat_interleave(rows, dim=-2).repeat_interleave(cols, dim=-1)
        return torch.cat([stitched, spread], dim=-3)

    def summed_views(self, values: torch.Tensor) -> torch.Tensor:
        """(..., views * N) values at the image tokens -> (..., H, W): the tiles' and the global view's summed."""
        side = self.vision_grid()[0] // self.scale
        views = values.reshape(*values.shape[:-1], -1, side * side, 1)
        grid = self.views_to_grid(views, side)
        return grid.sum(dim=-3) if grid.shape[-3] > 1 else grid[..., 0, :, :]

    def _is_sequence(self, tensor: torch.Tensor, lead: int) -> bool:
        rows = self._image_rows
        return rows is not None and tensor.shape[lead] == rows.shape[1] and tensor.shape[lead - 1] == rows.shape[0]

    def _samples(self, activation: torch.Tensor) -> int:
        """The images in a layer output: a vision layer holds each image's views as rows."""
        if self._is_sequence(activation, 1):
            return int(activation.shape[0])
        return int(activation.shape[0]) // self.view_count(self._current_tiles())

    def _tokens_to_grid(self, tensor: torch.Tensor, lead: int) -> torch.Tensor:
        """(..., rows, N, C) tokens -> (..., B, C', H, W): the language model's hidden states at the
        image tokens, or a vision layer's (views of each image as rows) patch tokens or the
        connector's shuffled tokens, stitched by ``views_to_grid``."""
        patches = self.vision_grid()[0]
        views = self.view_count(self._current_tiles())
        count, batch = tensor.shape[lead], tensor.shape[lead - 1]
        if self._is_sequence(tensor, lead):
            positions = self.image_positions(self._image_rows).to(tensor.device)  # (B, views * N)
            index = positions.reshape(*([1] * (lead - 1)), *positions.shape, 1)
            picked = tensor.gather(lead, index.expand(*tensor.shape[:lead], positions.shape[1], tensor.shape[-1]))
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

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> AttentionGraph:
        """The language model's joint self-attention; the image columns span the first to the last
        image token (the views' separators in between are left out by the placement), the views'
        maps summed on the stitched grid."""
        positions = self.image_positions(inputs["input_ids"] == self.image_token_id)
        if not bool((positions == positions[:1]).all()):
            raise ValueError("the image tokens sit at different positions in the rows of one forward")
        start, end = int(positions[0, 0]), int(positions[0, -1]) + 1
        relative = (positions[0] - start).cpu()
        tiles = self._current_tiles()

        def placement(image: torch.Tensor) -> torch.Tensor:
            saved, self._tiles = self._tiles, tiles
            try:
                return self.summed_views(image[..., relative.to(image.device)])
            finally:
                self._tiles = saved

        layers = attention_modules(self.language_model, {"self_attn": "joint"})
        return AttentionGraph(layers, self.image_token_grid(), slice(start, end),
                              context=partial(eager_attention, self.vlm), placement=placement)

    # ------------------------------------------------------------------ the prompt
    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's ids with the image tokens expanded for the current tile grid (laid out by
        the processor once per prompt and grid, with a probe of the image's size)."""
        tiles = self._current_tiles()
        key = (text, tiles)
        if key not in self._prompt_cache:
            height, width = self._probe_size
            ids = self.prompt_inputs(text, Image.new("RGB", (width, height), (128, 128, 128)))["input_ids"]
            self._prompt_cache[key] = ids[0].tolist()
            self.image_positions(ids == self.image_token_id)  # the probe gave the image's tile grid
        return self._prompt_cache[key]


# ----------------------------------------------------------------------------- captioning
class Idefics3Captioner(Idefics3Family, ChatCaptioner):
    """Captioning as the assistant's reply; one forward per tile grid."""

    def tokenize(self, caption: str) -> TiledTokens:
        tokens = super().tokenize(caption)
        return TiledTokens(**{f.name: getattr(tokens, f.name) for f in fields(CaptionTokens)},
                           tiles=self._current_tiles())

    def batch_inputs(self, pixel_values: torch.Tensor, tokens: Sequence[CaptionTokens]) -> dict[str, torch.Tensor]:
        """The views of the captions' images (concatenated, or (B, views, C, T, T)) and the text."""
        tiles = [getattr(t, "tiles", None) for t in tokens]
        if any(t is None for t in tiles) or len(set(tiles)) != 1:
            raise ValueError("captions laid out without their image's tiles, or of several tile grids: tokenize them "
                             "through explain, explain_batch or prepare")
        views = self.view_count(tiles[0])
        if pixel_values.dim() == 4:
            pixel_values = torch.stack(self.split_views(pixel_values, tiles))
        if pixel_values.shape[:2] != (len(tokens), views):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} given for {len(tokens)} image(s) of "
                             f"{views} views")
        return {"pixel_values": pixel_values, **self.collate(tokens)}

    def prepare(self, image: ImageLike, text: str) -> tuple[dict[str, torch.Tensor], AxisAligned]:
        pil = load_image(image)
        with self.tiles_of(self.processor.geometry((pil.height, pil.width))):
            return super().prepare(pil, text)

    def explain_prepared(self, inputs: dict[str, torch.Tensor], geometry: Any, text: str, *args: Any,
                         **kwargs: Any) -> Any:
        with self.tiles_of(geometry):
            return super().explain_prepared(inputs, geometry, text, *args, **kwargs)

    def explain_pixels(self, pixel_values: torch.Tensor, geometries: Sequence[Any], captions: Sequence[str],
                       **options: Any) -> list[Any]:
        """``Captioner.explain_pixels`` on the concatenated views of several images (their tile
        grids read from their geometries): one forward and one batched backward per tile grid."""
        if len(captions) != len(geometries):
            raise ValueError(f"explain_pixels needs one geometry and one caption per image: {len(geometries)} "
                             f"geometries, {len(captions)} captions")
        tiles = [self.geometry_tiles(g) for g in geometries]
        images = self.split_views(pixel_values, tiles)
        results: list[Any] = [None] * len(tiles)
        for _, index in group_indices(tiles).items():
            with self.tiles_of(geometries[index[0]]):
                tokens = [self.tokenize(captions[i]) for i in index]
                inputs = self.batch_inputs(torch.stack([images[i] for i in index]), tokens)
                found = self._explain_tokens(inputs, tokens, [geometries[i] for i in index], **options)
            for i, result in zip(index, found):
                results[i] = result
        return results

    def score_batch(self, images: Sequence[ImageLike], captions: Sequence[str],
                    batch_size: int = 64) -> list[list[float]]:
        if len(images) != len(captions):
            raise ValueError(f"{len(captions)} captions given for {len(images)} images")
        pils = [load_image(image) for image in images]
        geometries = [self.processor.geometry((pil.height, pil.width)) for pil in pils]
        scores: list[list[float]] = [[] for _ in pils]
        for _, index in group_indices([self.geometry_tiles(g) for g in geometries]).items():
            with self.tiles_of(geometries[index[0]]):
                found = super().score_batch([pils[i] for i in index], [captions[i] for i in index], batch_size)
            for i, score in zip(index, found):
                scores[i] = score
        return scores

    def _readout_explanations(self, *args: Any, **kwargs: Any) -> dict[str, Explanation]:
        """TAM's maps, upsampled to the resized image (the pixel input holds views, not an image)."""
        found = super()._readout_explanations(*args, **kwargs)
        return {name: replace(exp, input_size=self.layer_options["input_size"]) for name, exp in found.items()}

    def image_token_logits(self, output: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """The LM head's logits at every view's image tokens, the tiles' and the global view's summed per cell."""
        logits, _ = super().image_token_logits(output, inputs)  # (B, views * N, V)
        grid = self.summed_views(logits.transpose(1, 2))  # (B, V, H, W)
        return grid.flatten(2).transpose(1, 2), self.image_token_grid()

    def generate_batch(self, images: Sequence[ImageLike], beam_size: int = 1,
                       max_words: int | None = None) -> list[str]:
        prepared = [self.preprocess(image) for image in images]
        return self.generate_from_pixels(torch.cat([inputs["pixel_values"] for inputs, _ in prepared]), beam_size,
                                         max_words, geometries=[geometry for _, geometry in prepared])

    def generate_from_pixels(self, pixel_values: torch.Tensor, beam_size: int = 1, max_words: int | None = None,
                             geometries: Sequence[Any] | None = None) -> list[str]:
        """The replies to the prompt for the concatenated views of several images, one generate
        per tile grid (read from the images' geometries)."""
        if geometries is None:
            raise ValueError(f"{type(self.vlm).__name__}'s views of an image depend on its size: "
                             "generate_from_pixels needs each image's geometry (geometries=, from preprocess)")
        tiles = [self.geometry_tiles(g) for g in geometries]
        images = self.split_views(pixel_values, tiles)
        captions = [""] * len(tiles)
        for _, index in group_indices(tiles).items():
            with self.tiles_of(geometries[index[0]]):
                prompt = self.prompt_ids(self.prompt)
            ids = torch.tensor([prompt] * len(index), device=self.device)
            with torch.no_grad(), preserved_state(self.vlm), self.forward_context():
                out = self.vlm.generate(pixel_values=self.to_device(torch.stack([images[i] for i in index])),
                                        input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=self.max_new_tokens, num_beams=beam_size, do_sample=False,
                                        use_cache=self.generation_cache)
            texts = self.tokenizer.batch_decode(out[:, len(prompt):], skip_special_tokens=True)
            for i, text in zip(index, texts):
                captions[i] = first_words(text.strip(), max_words)
        return captions


# ----------------------------------------------------------------------------- VQA
class Idefics3VQA(Idefics3Family, ChatVQA):
    """Generative VQA: K answers as K rows over one encoded image (its views)."""

    def prepare(self, image: ImageLike, text: str) -> tuple[dict[str, torch.Tensor], AxisAligned]:
        inputs, geometry = super().prepare(image, text)
        with self.tiles_of(geometry):  # the processor's layout has the image's views
            self.image_positions(inputs["input_ids"] == self.image_token_id)
        return inputs, geometry

    def explain_prepared(self, inputs: dict[str, torch.Tensor], geometry: Any, text: str, *args: Any,
                         **kwargs: Any) -> Any:
        with self.tiles_of(geometry):
            return super().explain_prepared(inputs, geometry, text, *args, **kwargs)


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
