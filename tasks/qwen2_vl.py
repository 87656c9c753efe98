"""Qwen2-VL and Qwen2.5-VL (transformers): Qwen2VLForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration, captioning and generative VQA.

Preset layer: the vision tower's last block, on the patch grid. The patch merger reads exactly its
tokens (each 2x2 block of 14 px patches becomes one language-model token), and the grid is the
finest the model has: one cell per 14 px patch, against 28 px for the image tokens in the language
model's sequence (any layer can be named, those included).

Geometry. The processor's ``smart_resize`` scales the whole image (no crop: every pixel is seen) to
sides that are multiples of 28 (patch 14 x merge 2) within its min/max pixels, then flattens it
into patches: ``pixel_values`` (patches, C * T * 14 * 14) and ``image_grid_thw`` (t, h, w) per image,
each 2x2 merge block's four patches consecutive. The resize is measured (``PatchGeometry``: the
patches put back into an image) and inverted. The vision tower runs the patches of all images as one
packed sequence with no batch dimension; Qwen2.5-VL's blocks run the merge blocks in
attention-window order (``window_index``), which the tower undoes only after the merger. A vision
layer's tokens are put back in raster order: on the patch grid h x w, or on the merged grid
(h/2) x (w/2) for a merged tensor such as the merger's output; the language model's image tokens
are in raster order on the merged grid already (the merger's reverse index).

The number of image tokens depends on the image: the prompt is laid out per image grid, and
images of different grids in one ``explain_batch`` / ``explain_pixels`` / ``score_batch`` /
``generate_batch`` / ``generate_from_pixels`` call run as one forward per grid (images of the same
grid share one); packed patches are split by the grids their geometries give. Guided Grad-CAM is
refused: its pixel gradients would be taken on the flattened patches, not on a (B, C, H, W) image.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmgradcam.engine import resolve_layer

from .captioning import CaptionTokens
from .chat_vlm import ChatVLM, EncodedImageLM, LayoutPerImageCaptioner, LayoutPerImageVQA
from .common import register_adapter
from .geometry import AxisAligned, probe_geometry
from .hf import ProcessorGeometry, last_block_name

LAYER_REASON = ("the vision tower's last block: the patch merger reads its patch tokens (2x2 patches -> one "
                "language-model token); its patch grid (one cell per 14 px) is the finest the model has")
Grid = tuple[int, int, int]  # (t, h, w) patches of one image, as in image_grid_thw


def unpatchify(pixel_values: torch.Tensor, grid: Sequence[int], patch: int, merge: int,
               temporal: int) -> torch.Tensor:
    """One image's flattened patches (t*h*w, C*T*P*P), each merge block's patches consecutive
    (the Qwen2-VL processor's order), back into its first frame (C, h*P, w*P)."""
    t, h, w = (int(v) for v in grid)
    channels = pixel_values.shape[-1] // (temporal * patch * patch)
    blocks = pixel_values.reshape(t, h // merge, w // merge, merge, merge, channels, temporal, patch, patch)
    first = blocks[0, :, :, :, :, :, 0]  # (h/m, w/m, m, m, C, P, P)
    return first.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * patch, w * patch)


class PatchGeometry(ProcessorGeometry):
    """The processor's resize measured with coordinate ramps, read from its flattened patches put
    back into an image."""

    def geometry(self, size: tuple[int, int]) -> AxisAligned:
        if size not in self._cache:
            processor = self.image_processor

            def process(array: np.ndarray) -> torch.Tensor:
                out = processor(images=array, do_rescale=False, do_normalize=False, return_tensors="pt")
                return unpatchify(out["pixel_values"], out["image_grid_thw"][0], processor.patch_size,
                                  processor.merge_size, processor.temporal_patch_size).float()

            self._cache[size] = probe_geometry(process, size)
        return self._cache[size]


@dataclass
class GridTokens(CaptionTokens):
    """A caption laid out after the prompt of an image with ``image_grid`` (t, h, w) patches."""

    image_grid: Grid = (1, 0, 0)


class QwenVLFamily(ChatVLM):
    """What Qwen2-VL's and Qwen2.5-VL's captioner and answerer share: the patch geometry, the prompt
    laid out per image grid, the vision tower's packed tokens put back in raster order, M-RoPE's
    inputs (``image_grid_thw``, ``mm_token_type_ids``)."""

    layer_reason = LAYER_REASON
    default_prompt = "Describe this image."  # the model card's example
    question_prompt = "{question}\nAnswer the question using a single word or phrase."
    geometry_class = PatchGeometry
    window_attention = False  # Qwen2.5-VL: the vision blocks run the merge blocks in window order
    pixel_input = "flattened patches (pixel_values (patches, C*T*P*P))"
    image_input_keys = ("pixel_values", "image_grid_thw")  # the vision tower needs the image's grid

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        # the image(s) being laid out or explained: their grid, how many the vision tower packs,
        # whether the explained layer sees them in window order
        self._grid: Grid | None = None
        self._images = 0
        self._windowed = False
        super().__init__(model, tokenizer, image_processor, name, processor)

    # ------------------------------------------------------------------ the model
    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.base_model.visual

    @property
    def merge(self) -> int:
        return int(self.vlm.config.vision_config.spatial_merge_size)

    @property
    def patch(self) -> int:
        return int(self.vlm.config.vision_config.patch_size)

    def preset_layer(self) -> str:
        return last_block_name(self.vlm, self.vision_tower)

    def sequence_inputs(self, input_ids: torch.Tensor, reply_start: int) -> dict[str, torch.Tensor]:
        """M-RoPE places the image tokens on their grid: the model finds them by their type ids."""
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}

    def image_outputs(self, pixel_inputs: Mapping[str, torch.Tensor]) -> Any:
        return self.vlm.get_image_features(pixel_values=pixel_inputs["pixel_values"],
                                           image_grid_thw=pixel_inputs["image_grid_thw"], return_dict=True)

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """The base's context, and the model's M-RoPE offsets (``rope_deltas``, which every forward
        and generate overwrites) put back after."""
        holder = self.vlm.base_model
        before = getattr(holder, "rope_deltas", None)
        try:
            with super().forward_context():
                yield
        finally:
            if hasattr(holder, "rope_deltas"):
                holder.rope_deltas = before

    # ------------------------------------------------------------------ the images of a call
    def image_grid(self, image: Image.Image) -> Grid:
        """(t, h, w) patches the processor makes of ``image`` (from its measured resize)."""
        return self.geometry_grid(self.processor.geometry((image.height, image.width)))

    def geometry_grid(self, geometry: AxisAligned) -> Grid:
        """(t, h, w) patches of the resized image a geometry maps back (its input size)."""
        height, width = geometry.input_size
        return 1, height // self.patch, width // self.patch

    def split_patches(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> list[torch.Tensor]:
        """The packed patches of several images, one tensor per image."""
        counts = [t * h * w for t, h, w in grids]
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(f"{pixel_values.shape[0]} patches given for images of {sum(counts)} patches ({list(grids)})")
        return list(pixel_values.split(counts))

    @contextlib.contextmanager
    def images_of(self, grid_thw: torch.Tensor | Grid | list[Grid], layer: nn.Module | str | None = None
                  ) -> Iterator[None]:
        """For the duration: the images of one forward (``image_grid_thw`` (n, 3), a list of their
        grids, or one image's grid), all of one grid; the layout of ``layer`` (None: the preset) and
        the size of the resized image the maps are upsampled to. Restored after, also on errors."""
        rows = [grid_thw] if isinstance(grid_thw, tuple) else (
            grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else list(grid_thw))
        grids = {tuple(int(v) for v in row) for row in rows}
        if len(grids) != 1:
            raise ValueError(f"one forward explains images of one patch grid, got {sorted(grids)}")
        grid = grids.pop()
        windowed = self.window_attention and not self._before_windows(layer)
        with self.laid_out((grid[1] * self.patch, grid[2] * self.patch), _grid=grid, _images=len(rows),
                           _windowed=windowed):
            yield

    def _current_grid(self) -> Grid:
        if self._grid is None:
            raise ValueError(f"{type(self.vlm).__name__}'s image tokens depend on the image: lay out and explain "
                             "captions through explain / explain_batch / prepare (they know the image)")
        return self._grid

    def _before_windows(self, layer: nn.Module | str | None) -> bool:
        """True for the patch embedding (and its parts): its tokens are not yet in window order."""
        spec = self.default_layer if layer is None else layer
        module = spec if isinstance(spec, nn.Module) else resolve_layer(self.vlm, spec)[1]
        embedding = self.vision_tower.get_input_embeddings()
        return any(module is m for m in embedding.modules())

    # the images of a call, grouped by grid (``LayoutPerImage``)
    def layout_key(self, geometry: AxisAligned) -> Grid:
        return self.geometry_grid(geometry)

    def images_at(self, geometries: Sequence[AxisAligned]) -> contextlib.AbstractContextManager:
        return self.images_of([self.geometry_grid(g) for g in geometries])

    def images_in(self, inputs: Mapping[str, torch.Tensor],
                  layer: nn.Module | str | None = None) -> contextlib.AbstractContextManager:
        return self.images_of(inputs["image_grid_thw"], layer)

    def split_pixels(self, pixel_values: torch.Tensor, geometries: Sequence[AxisAligned]) -> list[torch.Tensor]:
        return self.split_patches(pixel_values, [self.geometry_grid(g) for g in geometries])

    def pixel_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The packed patches of the current images and their grids."""
        grid_thw = torch.tensor([self._current_grid()] * self._images, dtype=torch.long, device=self.device)
        return {"pixel_values": pixel_values, "image_grid_thw": grid_thw}

    # ------------------------------------------------------------------ the grid of a layer
    def vision_grid(self) -> tuple[int, int]:
        """The patch grid of the current image(s): the vision tower's tokens."""
        _, h, w = self._current_grid()
        return h, w

    def image_token_grid(self) -> tuple[int, int]:
        """The merged grid: the image tokens of the language model's sequence."""
        h, w = self.vision_grid()
        return h // self.merge, w // self.merge

    def _samples(self, activation: torch.Tensor) -> int:
        """The images in a layer output: a vision layer's (tokens, C) packs them all."""
        return self._images if activation.dim() == 2 else int(activation.shape[0])

    def window_index(self, grid: Grid) -> torch.Tensor:
        """(merge blocks,): the raster merge block at each position of the window order, from the
        function the vision tower's own module uses."""
        tower = self.vision_tower
        grid_thw = torch.tensor([grid], dtype=torch.long, device=self.device)
        if callable(getattr(tower, "get_window_index", None)):  # transformers 4.x
            return tower.get_window_index(grid_thw)[0].to(self.device)
        find = getattr(inspect.getmodule(type(tower)), "get_vision_window_index", None)
        if find is None:
            raise RuntimeError(f"cannot find the window order of {type(tower).__name__} (get_vision_window_index)")
        config = self.vlm.config.vision_config
        return find(grid_thw, spatial_merge_size=self.merge, window_size=config.window_size,
                    patch_size=self.patch)[0].to(self.device)

    def raster_order(self, merged: bool) -> torch.Tensor:
        """(cells,): the position in the vision tower's sequence of each raster cell of one image,
        on the patch grid or (``merged``) on the merged grid."""
        _, h, w = self._current_grid()
        m, device = self.merge, self.device
        blocks_w = w // m
        blocks = (h // m) * blocks_w
        # where each raster merge block sits: in order, or (Qwen2.5-VL's blocks) in window order
        slot = torch.argsort(self.window_index(self._grid)) if self._windowed else torch.arange(blocks, device=device)
        if merged:
            return slot
        rows, cols = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)[None, :]
        block = (rows // m) * blocks_w + cols // m
        within = (rows % m) * m + cols % m  # the four patches of a block are consecutive, row by row
        return (slot[block] * m * m + within).flatten()

    def _tokens_to_grid(self, tensor: torch.Tensor, lead: int) -> torch.Tensor:
        """A vision layer's packed (..., images * tokens, C) -> (..., images, C, h, w) in raster
        order; a language-model layer as the base does (its image tokens, merged grid)."""
        if tensor.dim() != lead + 1:
            return super()._tokens_to_grid(tensor, lead)
        _, h, w = self._current_grid()
        per_image, rest = divmod(tensor.shape[lead - 1], max(self._images, 1))
        if rest == 0 and per_image == h * w:
            grid, merged = (h, w), False
        elif rest == 0 and per_image * self.merge ** 2 == h * w:
            grid, merged = self.image_token_grid(), True
        else:
            raise ValueError(f"a vision layer output of {tensor.shape[lead - 1]} tokens does not hold {self._images} "
                             f"image(s) of {h}x{w} patches (or {h * w // self.merge ** 2} merged tokens)")
        packed = tensor.reshape(*tensor.shape[:lead - 1], self._images, per_image, tensor.shape[-1])
        picked = packed.index_select(lead, self.raster_order(merged).to(tensor.device))
        return picked.reshape(*picked.shape[:-2], *grid, picked.shape[-1]).movedim(-1, lead)

    # ------------------------------------------------------------------ the prompt
    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's ids with the image tokens expanded for the current image grid (laid out
        by the processor once per prompt and grid, with an image of the resized size)."""
        grid = self._current_grid()
        key = (text, grid)
        if key not in self._prompt_cache:
            size = (grid[2] * self.patch, grid[1] * self.patch)  # (width, height): resized already
            probe = Image.new("RGB", size, (128, 128, 128))
            self._prompt_cache[key] = self.prompt_inputs(text, probe)["input_ids"][0].tolist()
        return self._prompt_cache[key]


# ----------------------------------------------------------------------------- captioning
class QwenCaptioner(QwenVLFamily, LayoutPerImageCaptioner):
    """Captioning as the assistant's reply; one forward per image grid (``LayoutPerImage``)."""

    def tokenize(self, caption: str) -> GridTokens:
        tokens = super().tokenize(caption)
        return GridTokens(**{f.name: getattr(tokens, f.name) for f in fields(CaptionTokens)},
                          image_grid=self._current_grid())

    def batch_inputs(self, pixel_values: torch.Tensor, tokens: Sequence[CaptionTokens]) -> dict[str, torch.Tensor]:
        grids = [getattr(t, "image_grid", None) for t in tokens]
        if any(g is None for g in grids):
            raise ValueError("captions laid out without their image's grid: tokenize them through explain, "
                             "explain_batch or prepare")
        patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != patches:
            raise ValueError(f"{pixel_values.shape[0]} patches given for images of {patches} patches ({grids})")
        grid_thw = torch.tensor(grids, dtype=torch.long, device=self.device)
        return {"pixel_values": pixel_values, "image_grid_thw": grid_thw, **self.collate(tokens)}


# ----------------------------------------------------------------------------- VQA
class QwenEncodedImageLM(EncodedImageLM):
    """``EncodedImageLM`` with M-RoPE's inputs in the language model's forward: the image's grid
    for each of the K answer rows, and the rows' image-token type ids (``sequence_inputs``)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_ids: torch.Tensor | None = None,
                answer_mask: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                **pixel_inputs: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        count = 1 if answer_ids is None else answer_ids.shape[0]
        encoded = self.encode({"pixel_values": pixel_inputs["pixel_values"], "image_grid_thw": image_grid_thw})
        features = [f for f in encoded.pooler_output for _ in range(count)]  # one image, K rows
        ids, mask = input_ids, attention_mask
        if answer_ids is not None:
            ids = torch.cat([input_ids.expand(count, -1), answer_ids], dim=1)
            mask = torch.cat([attention_mask.expand(count, -1), answer_mask], dim=1)
        return self.vlm(input_ids=ids, attention_mask=mask, image_grid_thw=image_grid_thw.repeat(count, 1),
                        **self.sequence_inputs(ids, input_ids.shape[1]), **self.reply_window(answer_ids),
                        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)}).logits


class QwenVQA(QwenVLFamily, LayoutPerImageVQA):
    """Generative VQA: K answers as K rows over one encoded image."""

    def engine_model(self, model: nn.Module) -> nn.Module:
        return QwenEncodedImageLM(model, self.image_outputs, self.sequence_inputs)


# ----------------------------------------------------------------------------- registration
@register_adapter("captioning", model_type="qwen2_vl", model_class="Qwen2VLForConditionalGeneration")
class Qwen2VLCaptioner(QwenCaptioner):
    family = "qwen2-vl"


@register_adapter("vqa", model_type="qwen2_vl", model_class="Qwen2VLForConditionalGeneration")
class Qwen2VLVQA(QwenVQA):
    family = "qwen2-vl"


@register_adapter("captioning", model_type="qwen2_5_vl", model_class="Qwen2_5_VLForConditionalGeneration")
class Qwen2_5_VLCaptioner(QwenCaptioner):
    family = "qwen2.5-vl"
    window_attention = True


@register_adapter("vqa", model_type="qwen2_5_vl", model_class="Qwen2_5_VLForConditionalGeneration")
class Qwen2_5_VLVQA(QwenVQA):
    family = "qwen2.5-vl"
    window_attention = True
