"""LLaVA-1.5 (transformers): LlavaForConditionalGeneration captioning and generative VQA.

Preset layer: the vision tower's block at the config's ``vision_feature_layer`` (default -2, the
second-to-last block): the projector reads exactly its patch tokens, while the last block's output
reaches nothing (zero gradient). CLS is dropped (``vision_feature_select_strategy="default"``); the
grid is image_size / patch_size (24x24 at 336 px, patch 14). The CLIP processor's resize and center
crop are measured and inverted: the sides outside the crop are marked unseen.
"""
from __future__ import annotations

from mmgradcam.engine import resolve_layer

from .chat_vlm import ChatCaptioner, ChatVLM, ChatVQA
from .common import register_adapter
from .hf import encoder_blocks

LAYER_REASON = ("the vision tower's block at vision_feature_layer (default -2): the projector reads its patch "
                "tokens, the last block's output reaches nothing")


class LlavaFamily(ChatVLM):
    family = "llava"
    layer_reason = LAYER_REASON
    # LLaVA-1.5's own short-answer prompt (its VQAv2 evaluation)
    question_prompt = "{question}\nAnswer the question using a single word or phrase."

    def preset_layer(self) -> str:
        """The vision block whose output is ``hidden_states[vision_feature_layer]`` (hidden state 0
        is the embeddings, state i the output of block i - 1); of several layers, the last listed."""
        layer = self.vlm.config.vision_feature_layer
        layer = int(layer[-1] if isinstance(layer, (list, tuple)) else layer)
        blocks = encoder_blocks(self.vision_tower)
        index = layer + len(blocks) + 1 if layer < 0 else layer
        if not 1 <= index <= len(blocks):
            raise ValueError(f"vision_feature_layer {layer} selects no block of the vision tower's {len(blocks)}: "
                             "name a layer with layer=")
        return resolve_layer(self.vlm, blocks[index - 1][1])[0]


@register_adapter("captioning", model_type="llava", model_class="LlavaForConditionalGeneration")
class LlavaCaptioner(LlavaFamily, ChatCaptioner):
    pass


@register_adapter("vqa", model_type="llava", model_class="LlavaForConditionalGeneration")
class LlavaVQA(LlavaFamily, ChatVQA):
    pass
