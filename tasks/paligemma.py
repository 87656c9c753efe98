"""PaliGemma (transformers): PaliGemmaForConditionalGeneration captioning and generative VQA.

PaliGemma has no chat template: its input is the image tokens, then BOS, the task prefix and a
"\\n" (laid out by PaliGemmaProcessor), then the output as a suffix tokenized on its own. The
captioning prompt is the task prefix "caption en", VQA's "answer en {question}"; the caption or
answer is the suffix. The prefix (image tokens and task text) attends bidirectionally and the
suffix causally: ``token_type_ids`` (0 prefix, 1 suffix) say where the suffix starts and go with
every forward -- without them the Gemma decoder attends both ways over the whole sequence, so a
caption's tokens would see the words after them.

Preset layer: the SigLIP tower's last block: the projector reads its patch tokens (after the
post-layernorm), all of them (SigLIP has no CLS). The grid is image_size / patch_size (16x16 at
224 px, 32x32 at 448, 64x64 at 896; patch 14), one image token per patch. The processor resizes
to a square without keeping the aspect ratio: the map is stretched back over the whole image.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .chat_vlm import ChatCaptioner, ChatVLM, ChatVQA
from .common import register_adapter
from .hf import last_block_name

LAYER_REASON = ("the SigLIP tower's last block: the projector reads its patch tokens (after the post-layernorm), "
                "all of them (no CLS)")


class PaliGemmaFamily(ChatVLM):
    family = "paligemma"
    layer_reason = LAYER_REASON
    uses_chat_template = False  # a task prefix, laid out by the processor
    default_prompt = "caption en"
    question_prompt = "answer en {question}"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        if processor is not None and not getattr(processor, "image_token", None):
            raise ValueError("PaliGemma needs its PaliGemmaProcessor (processor=...): it places the image tokens")
        super().__init__(model, tokenizer, image_processor, name, processor)

    def preset_layer(self) -> str:
        return last_block_name(self.vlm, self.vision_tower)

    def prompt_text(self, text: str) -> str:
        """The processor's text: the image token, then the task prefix (the processor expands the
        image token, adds BOS after it and the "\\n" that ends the prefix)."""
        return f"{self.chat.image_token}{text}"

    def reply_tokens(self, reply: str) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """The suffix as the processor tokenizes it (on its own, after the prefix's "\\n"; its EOS is
        not scored)."""
        encoded = self.tokenizer(reply, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        specials = set(self.tokenizer.all_special_ids)
        return ids, offsets, [i in specials for i in ids]

    def sequence_inputs(self, input_ids: torch.Tensor, reply_start: int) -> dict[str, torch.Tensor]:
        """``token_type_ids``: 0 over the prefix (bidirectional), 1 from the suffix on (causal)."""
        types = torch.zeros_like(input_ids)
        types[:, reply_start:] = 1
        return {"token_type_ids": types}


@register_adapter("captioning", model_type="paligemma", model_class="PaliGemmaForConditionalGeneration")
class PaliGemmaCaptioner(PaliGemmaFamily, ChatCaptioner):
    pass


@register_adapter("vqa", model_type="paligemma", model_class="PaliGemmaForConditionalGeneration")
class PaliGemmaVQA(PaliGemmaFamily, ChatVQA):
    pass
