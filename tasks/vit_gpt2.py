"""VisionEncoderDecoderModel (transformers): a ViT or Swin encoder with a GPT-2 style decoder.

Preset layer: the encoder's last block; the decoder cross-attends to every encoder token.
Captions are fed as ``decoder_input_ids`` after the decoder start token.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


import torch
from torch import nn

from mmgradcam.engine.attention import AttentionGraph

from .common import register_adapter
from .hf import decoder_graph, HFCaptioner, last_block_name


@register_adapter("captioning", model_type="vision-encoder-decoder", model_class="VisionEncoderDecoderModel")
class VisionEncoderDecoderCaptioner(HFCaptioner):
    family = "vit_gpt2"
    layer_reason = "the encoder's last block: the decoder cross-attends to all its tokens"
    input_key = "decoder_input_ids"
    mask_key = "decoder_attention_mask"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "vit-gpt2"):
        super().__init__(model, tokenizer, image_processor, name)
        self.default_layer = last_block_name(model, model.encoder)
        start = model.config.decoder_start_token_id
        self.decoder_start_id = int(start if start is not None else tokenizer.bos_token_id)
        # Swin encoders end on a (B, h*w, C) token map with no CLS: the engine's layout infers it
        if getattr(model.config.encoder, "model_type", "") == "swin":
            self.layer_options = {"prefix_tokens": 0}

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> AttentionGraph:
        """GPT-2's self-attention and its cross-attention to the ViT encoder's tokens."""
        if getattr(self.model.config.encoder, "model_type", "") == "swin":
            raise ValueError("the attention methods need a ViT encoder (CLS + patch grid); this one is Swin")
        return decoder_graph(self.model, self.model.decoder, self.model.config.encoder,
                             {"attn": "self", "crossattention": "cross"})

    def _max_tokens(self) -> int:
        return int(getattr(self.model.config.decoder, "n_positions", None)
                   or getattr(self.model.config.decoder, "max_position_embeddings", 1024))
