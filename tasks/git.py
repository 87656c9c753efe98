"""GIT (transformers): GitForCausalLM captioning.

Preset layer: the CLIP image encoder's last block; GIT projects all its tokens into the text
decoder's sequence, so every patch token gets gradient. GIT's logits start with the image
positions, which are excluded from the word targets; its CLIP-style preprocessing (resize the
short side, center crop) leaves the area outside the crop unseen (``seen`` False, map 0).
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from mmgradcam.engine.attention import AttentionGraph
from mmgradcam.targets import logits_of

from .common import register_adapter
from .hf import attention_modules, eager_attention, vit_grid, HFCaptioner, last_block_name


@register_adapter("captioning", model_type="git", model_class="GitForCausalLM")
class GitCaptioner(HFCaptioner):
    family = "git"
    layer_reason = "the image encoder's last block: all its tokens enter the text decoder's sequence"
    text_logits_from_end = True
    image_tokens_in_text = True  # TAM reads the LM head at the image prefix of the decoder's sequence

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "git"):
        super().__init__(model, tokenizer, image_processor, name)
        self.default_layer = last_block_name(model, model.git.image_encoder)

    def image_token_logits(self, output: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """GIT's logits cover the image tokens (the CLIP encoder's CLS, then its patch grid), then the text."""
        logits = logits_of(output)
        image_tokens = logits.shape[1] - inputs[self.input_key].shape[1]
        patch = int(self.model.config.vision_config.patch_size)
        h, w = (int(s) // patch for s in inputs["pixel_values"].shape[-2:])
        return logits[:, image_tokens - h * w:image_tokens], (h, w)

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> AttentionGraph:
        """One sequence of image tokens (CLS, then the patch grid) and text tokens: every block's
        self-attention is joint; the text rows start after the image tokens."""
        grid = vit_grid(self.model.config.vision_config)
        tokens = 1 + grid[0] * grid[1]
        return AttentionGraph(attention_modules(self.model.git.encoder, {"attention.self": "joint"}), grid,
                              slice(1, tokens), text_offset=tokens, context=partial(eager_attention, self.model))

    def _max_tokens(self) -> int:
        return int(self.model.config.max_position_embeddings)
