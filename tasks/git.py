"""GIT (transformers): GitForCausalLM captioning.

Preset layer: the CLIP image encoder's last block; GIT projects all its tokens into the text
decoder's sequence, so every patch token gets gradient. GIT's logits start with the image
positions, which are excluded from the word targets; its CLIP-style preprocessing (resize the
short side, center crop) leaves the area outside the crop unseen (``seen`` False, map 0).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .common import register_adapter
from .hf import HFCaptioner, last_block_name


@register_adapter("captioning", model_type="git", model_class="GitForCausalLM")
class GitCaptioner(HFCaptioner):
    family = "git"
    layer_reason = "the image encoder's last block: all its tokens enter the text decoder's sequence"
    text_logits_from_end = True

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "git"):
        super().__init__(model, tokenizer, image_processor, name)
        self.default_layer = last_block_name(model, model.git.image_encoder)

    def _max_tokens(self) -> int:
        return int(self.model.config.max_position_embeddings)
