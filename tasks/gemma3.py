"""Gemma 3 (transformers): Gemma3ForConditionalGeneration captioning and generative VQA.

The chat template writes ``<start_of_turn>user\\n<start_of_image>{prompt}<end_of_turn>\\n<start_of_turn>model\\n``;
Gemma3Processor expands ``<start_of_image>`` to the begin-of-image token, ``mm_tokens_per_image``
(256) ``<image_soft_token>`` tokens and the end-of-image token. The image tokens attend to each
other bidirectionally, the text causally: ``token_type_ids`` (1 at the image tokens) go with
every forward and generation, as the processor gives them.

Geometry: the SigLIP tower sees the image resized to a square (896 px, aspect ratio not kept, so
maps are stretched back over the whole image) as a 64x64 patch grid; the multi-modal projector
average-pools it 4x4 to a 16x16 grid of soft tokens (sqrt(mm_tokens_per_image) per side). A vision
layer's map is on the patch grid, a language-model layer's (its hidden states at the image tokens)
and the attention methods' on the pooled grid. Pan-and-scan (extra crops of a long image) is off by
default and refused when set: its crops are not one axis-aligned view of the image.

Preset layer: the SigLIP tower's last block: its patch tokens (after the post-layernorm) are what
the projector pools; no CLS.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
from torch import nn

from .chat_vlm import ChatCaptioner, ChatVLM, ChatVQA
from .common import register_adapter
from .hf import last_block_name

LAYER_REASON = ("the SigLIP tower's last block: the projector average-pools its patch tokens (after the "
                "post-layernorm) to the image tokens; no CLS")


class Gemma3Family(ChatVLM):
    family = "gemma3"
    layer_reason = LAYER_REASON

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        if getattr(image_processor, "do_pan_and_scan", None):
            raise ValueError("Gemma 3 with pan-and-scan is not supported (its crops are extra views of the image): "
                             "set do_pan_and_scan=False on the image processor")
        super().__init__(model, tokenizer, image_processor, name, processor)

    def preset_layer(self) -> str:
        return last_block_name(self.vlm, self.vision_tower)

    def image_token_grid(self) -> tuple[int, int]:
        """The projector's pooled grid: sqrt(mm_tokens_per_image) tokens per side."""
        side = math.isqrt(int(self.vlm.config.mm_tokens_per_image))
        return side, side

    def prompt_inputs(self, text: str, image: Image.Image) -> dict[str, torch.Tensor]:
        inputs = super().prompt_inputs(text, image)
        if inputs["pixel_values"].shape[0] != 1:
            raise ValueError("the processor made several crops of one image (pan-and-scan): turn it off")
        return inputs

    def sequence_inputs(self, input_ids: torch.Tensor, reply_start: int) -> dict[str, torch.Tensor]:
        """``token_type_ids``: 1 at the image tokens (they attend to each other both ways), 0 elsewhere."""
        return {"token_type_ids": (input_ids == self.image_token_id).long()}


@register_adapter("captioning", model_type="gemma3", model_class="Gemma3ForConditionalGeneration")
class Gemma3Captioner(Gemma3Family, ChatCaptioner):
    pass


@register_adapter("vqa", model_type="gemma3", model_class="Gemma3ForConditionalGeneration")
class Gemma3VQA(Gemma3Family, ChatVQA):
    pass
