"""BLIP-2 and InstructBLIP (transformers): Blip2ForConditionalGeneration and
InstructBlipForConditionalGeneration captioning and generative VQA, with a decoder-only language
model (OPT, Llama / Vicuna). A Flan-T5 (encoder-decoder) language model is refused.

No chat template: Blip2Processor / InstructBlipProcessor put ``num_query_tokens`` image tokens in
front of the tokenized text (BOS, then the prompt); the caption or answer follows the prompt
(after a space when the prompt is not empty). BLIP-2's captioning prompt is empty, its VQA prompt
"Question: {question} Answer:"; InstructBLIP's captioning prompt is the instruction "A short image
description:", its VQA prompt the question, and the instruction also goes to the Q-Former
(``qformer_input_ids``).

Preset layer: the vision encoder's last block: the Q-Former cross-attends to its tokens (after the
post-layernorm). CLS is dropped; the grid is image_size / patch_size (16x16 at 224 px, patch 14).
The 32 Q-Former queries that become the image tokens have no spatial layout, so a layer of the
Q-Former or of the language model is refused. The BLIP image processor resizes to a square
without keeping the aspect ratio: the map is stretched back over the whole image. The attention
methods (relevance through the Q-Former's cross-attention) and TAM (the LM head at the image
tokens, which have no grid) are not implemented and refused by name.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmgradcam.engine import resolve_layer

from .chat_vlm import MAX_PREFIX_TOKENS, ChatCaptioner, ChatVLM, ChatVQA, EncodedImageLM
from .common import register_adapter
from .hf import last_block_name

LAYER_REASON = ("the vision encoder's last block: the Q-Former cross-attends to its patch tokens (CLS dropped); "
                "the query tokens in the language model have no spatial layout")


class QueryImageLM(EncodedImageLM):
    """``EncodedImageLM`` for BLIP-2 / InstructBLIP: their forward takes ``pixel_values`` (and
    InstructBLIP's ``qformer_input_ids``) as required arguments, None with encoded image outputs,
    and reads the Q-Former's outputs from the encoder output's own class."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_ids: torch.Tensor | None = None,
                answer_mask: torch.Tensor | None = None, **pixel_inputs: torch.Tensor) -> torch.Tensor:
        count = 1 if answer_ids is None else answer_ids.shape[0]
        ids, mask = input_ids, attention_mask
        if answer_ids is not None:
            ids = torch.cat([input_ids.expand(count, -1), answer_ids], dim=1)
            mask = torch.cat([attention_mask.expand(count, -1), answer_mask], dim=1)
        encoded = self.encode(pixel_inputs)
        features = encoded.pooler_output.expand(count, *encoded.pooler_output.shape[1:])  # (1, Q, D) -> K rows
        extra = {"qformer_input_ids": None} if "qformer_input_ids" in pixel_inputs else {}
        return self.vlm(pixel_values=None, input_ids=ids, attention_mask=mask, **extra,
                        mm_encoder_outputs={"image": type(encoded)(pooler_output=features)}).logits


class Blip2Family(ChatVLM):
    family = "blip2"
    layer_reason = LAYER_REASON
    uses_chat_template = False  # the processor puts the query tokens before the text
    default_prompt = ""  # BLIP-2 captions from the image alone
    question_prompt = "Question: {question} Answer:"
    image_tokens_in_text = False  # TAM: the query tokens have no grid

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        if not model.config.use_decoder_only_language_model:
            raise ValueError(f"{type(model).__name__} with an encoder-decoder language model "
                             f"({model.config.text_config.model_type}, e.g. Flan-T5) is not supported: "
                             "use a decoder-only one (OPT, Llama / Vicuna)")
        if processor is not None and not getattr(processor, "num_query_tokens", None):
            raise ValueError(f"{type(model).__name__} needs its processor with num_query_tokens set "
                             "(processor=...): it places the query tokens")
        super().__init__(model, tokenizer, image_processor, name, processor)

    def has_attention(self) -> bool:
        return False  # relevance through the Q-Former's cross-attention is not implemented

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_model

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.language_model

    def preset_layer(self) -> str:
        return last_block_name(self.vlm, self.vision_tower)

    def resolve_layer(self, layer: nn.Module | str | None) -> nn.Module | str:
        """Only a layer of the vision encoder has a grid: the Q-Former's 32 queries (the image
        tokens of the language model's sequence) have no spatial layout."""
        spec = self.default_layer if layer is None else layer
        module = spec if isinstance(spec, nn.Module) else resolve_layer(self.vlm, spec)[1]
        if not any(module is m for m in self.vision_tower.modules()):
            raise ValueError(f"layer {spec if isinstance(spec, str) else type(spec).__name__} is not in the vision "
                             f"encoder: {self.family}'s query tokens (Q-Former and language model) have no spatial "
                             "layout to map; name a layer under vision_model (the preset: "
                             f"{self.default_layer})")
        return super().resolve_layer(layer)

    def _tokens_to_grid(self, tensor: torch.Tensor, lead: int) -> torch.Tensor:
        """(..., B, N, C) vision tokens -> (..., B, C, h, w), CLS dropped (only vision layers are
        allowed, so a sequence of the language model's length is never read as one)."""
        h, w = self.vision_grid()
        count = tensor.shape[lead]
        if not 0 <= count - h * w <= MAX_PREFIX_TOKENS:
            raise ValueError(f"a layer output of {count} tokens is not the vision encoder's ({h}x{w} grid after "
                             f"up to {MAX_PREFIX_TOKENS} prefix tokens)")
        picked = tensor[..., count - h * w:, :]
        return picked.reshape(*picked.shape[:-2], h, w, picked.shape[-1]).movedim(-1, lead)

    def set_prompt(self, prompt: str) -> None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {prompt!r}")
        self.prompt = prompt  # may be empty: BLIP-2 captions from the image alone

    def prompt_text(self, text: str) -> str:
        return text

    def reply_separator(self) -> str:
        return " " if self.prompt.strip() else ""

    def reply_context(self) -> str:
        """The text the reply follows (captioning: the prompt)."""
        return self.prompt

    def reply_tokens(self, reply: str) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """The reply as the processor tokenizes it after the prompt (after a space, unless the prompt
        is empty): the prompt and the reply tokenized together, the prompt's tokens dropped (a
        SentencePiece tokenizer attaches the space to the reply's first piece)."""
        context, lead = self.reply_context(), self.reply_separator()
        start = len(context) + len(lead)
        before = list(self.tokenizer(context)["input_ids"])
        encoded = self.tokenizer(context + lead + reply, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        if ids[:len(before)] == before:
            first = len(before)
        else:  # the reply's first token merged with the prompt's end: keep the tokens that end in the reply
            first = next((i for i, (_, e) in enumerate(offsets) if e > start), len(ids))
        ids = ids[first:]
        offsets = [(max(s - start, 0), max(e - start, 0)) for s, e in offsets[first:]]
        specials = set(self.tokenizer.all_special_ids)
        return ids, offsets, [i in specials for i in ids]

    def in_language_model(self, layer: nn.Module | str | None) -> bool:
        self.resolve_layer(layer)  # refuses a layer outside the vision encoder
        return False


class InstructBlipFamily(Blip2Family):
    family = "instructblip"
    default_prompt = "A short image description:"
    question_prompt = "{question}"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        if processor is not None and getattr(processor, "qformer_tokenizer", None) is None:
            raise ValueError("InstructBLIP needs its InstructBlipProcessor (processor=...): the instruction also "
                             "goes to the Q-Former through its qformer_tokenizer")
        super().__init__(model, tokenizer, image_processor, name, processor)

    def qformer_inputs(self, text: str, rows: int = 1) -> dict[str, torch.Tensor]:
        """The instruction as the Q-Former reads it (``rows`` copies)."""
        encoded = self.chat.qformer_tokenizer(text, return_tensors="pt")
        return {"qformer_input_ids": encoded["input_ids"].expand(rows, -1).to(self.device),
                "qformer_attention_mask": encoded["attention_mask"].expand(rows, -1).to(self.device)}

    def image_outputs(self, pixel_inputs: Mapping[str, torch.Tensor]) -> Any:
        inputs = dict(pixel_inputs)
        if "qformer_input_ids" not in inputs:
            inputs.update(self.qformer_inputs(self.prompt, inputs["pixel_values"].shape[0]))
        return self.vlm.get_image_features(**inputs, return_dict=True)


class InstructBlipCaptionerBase(InstructBlipFamily):
    def sequence_inputs(self, input_ids: torch.Tensor, reply_start: int) -> dict[str, torch.Tensor]:
        """The captioning instruction for the Q-Former, one row per sequence (every forward and generation)."""
        return self.qformer_inputs(self.prompt, input_ids.shape[0])


class Blip2VQABase:
    def engine_model(self, model: nn.Module) -> nn.Module:
        return QueryImageLM(model, self.image_outputs)

    def reply_separator(self) -> str:
        return " "  # the answer follows the question prompt

    def reply_context(self) -> str:
        return "Answer:"  # a stand-in for the question prompt: the reply's tokens start after its space


@register_adapter("captioning", model_type="blip-2", model_class="Blip2ForConditionalGeneration")
class Blip2Captioner(Blip2Family, ChatCaptioner):
    pass


@register_adapter("vqa", model_type="blip-2", model_class="Blip2ForConditionalGeneration")
class Blip2VQA(Blip2VQABase, Blip2Family, ChatVQA):
    pass


@register_adapter("captioning", model_type="instructblip", model_class="InstructBlipForConditionalGeneration")
class InstructBlipCaptioner(InstructBlipCaptionerBase, ChatCaptioner):
    pass


@register_adapter("vqa", model_type="instructblip", model_class="InstructBlipForConditionalGeneration")
class InstructBlipVQA(Blip2VQABase, InstructBlipFamily, ChatVQA):
    pass
