"""Florence-2 (transformers 5.x native): Florence2ForConditionalGeneration captioning and generative
VQA, with Florence2Processor.

An encoder-decoder: the DaViT vision backbone's last (B, C, h, w) map goes through the projector
(2-D position embeddings added, flattened; its mean over the grid becomes one pooled token in front
of the grid's h*w tokens); these 1 + h*w image tokens are the first positions of the BART encoder's
sequence, followed by ``<s>``, the prompt and ``</s>`` (the processor lays this out and maps a task
token such as "<CAPTION>" to its text prompt). The BART decoder generates the text after its start
token and ``<s>``.

**Captioning**: the encoder prompt is a task token ("<CAPTION>" by default, "<DETAILED_CAPTION>",
"<MORE_DETAILED_CAPTION>" through ``prompt=``); the caption is the decoder's output, each word's
target the sum of its tokens' log-probabilities under teacher forcing (the decoder reads
``</s> <s> caption </s>``, as Florence-2 was trained). **VQA**: Florence-2 has no VQA task token:
the question itself is the encoder prompt (fine-tuned VQA checkpoints prefix it, e.g. "<VQA>": set
``question_prompt``), an answer's score the sum of its tokens' log-probabilities as the decoder's
output; the image and the question are encoded once and K candidate answers decoded as K rows.

**Where the map comes from**: the preset is the DaViT's last stage's last block, whose (B, C, h, w)
output the projector reads (h = w = 24 at 768 px: stride 32). Any layer of the DaViT gives its own
map; the projector and any layer of the BART encoder give their hidden states at the image grid's
positions (the pooled token left out). A layer of the decoder (its positions are text) is refused.
The processor resizes to a square without keeping the aspect ratio: maps are stretched back.

**Attention methods**: relevance and attention-gradcam through the decoder's self-attention and
its cross-attention to the encoder's outputs, read at the image grid's positions (the BART encoder,
which mixes image and prompt tokens, is not traversed, as BLIP's ViT is not). TAM is refused: the
decoded sequence holds no image tokens.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from mmgradcam.engine import resolve_layer
from mmgradcam.engine.attention import AttentionGraph

from .chat_vlm import ChatVLM, ChatVQA
from .common import register_adapter
from .hf import HFCaptioner, attention_modules, eager_attention

LAYER_REASON = ("the DaViT's last stage's last block: its (B, C, h, w) map is what the projector reads (position "
                "embeddings added; its grid mean is one pooled token before the grid's tokens in the encoder)")


def last_stage_blocks(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of a staged backbone's last stage, named under ``backbone``: the last ModuleList
    (in module order, the order the stages run) whose items are blocks of one class (a DaViT keeps
    one such list per stage, after the list of its patch embeddings)."""
    found: list[tuple[str, nn.Module]] = []
    for name, child in backbone.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) and len({type(m) for m in child}) == 1 \
                and not isinstance(child[0], nn.ModuleList):
            found = [(f"{name}.{i}", m) for i, m in enumerate(child)]
    if not found:
        raise ValueError(f"found no stages of blocks in {type(backbone).__name__}")
    return found


def decoder_start_token(model: nn.Module) -> int:
    """The token the decoder starts from: the generation config's, else the text config's."""
    start = model.generation_config.decoder_start_token_id
    return int(start if start is not None else model.config.text_config.decoder_start_token_id)


class EncodedPromptDecoder(nn.Module):
    """Florence-2 as the VQA engine's model: the image and the question encoded once (a batch of
    one: DaViT, projector, BART encoder), the K candidate answers decoded as K rows reading that
    encoding -> logits (K, L, V)."""

    def __init__(self, vlm: nn.Module) -> None:
        super().__init__()
        self.vlm = vlm
        self.start = decoder_start_token(vlm)  # the answer rows' first token too

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                answer_ids: torch.Tensor | None = None, answer_mask: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        # the image features put at the image tokens, as Florence2Model.forward does
        embeds = self.vlm.get_input_embeddings()(input_ids)
        image = self.vlm.get_image_features(pixel_values=pixel_values).pooler_output.to(embeds.dtype)
        placed = self.vlm.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=image)
        encoded = self.vlm.get_encoder()(inputs_embeds=embeds.masked_scatter(placed, image),
                                         attention_mask=attention_mask).last_hidden_state
        if answer_ids is None:  # no answers: the decoder's start alone
            answer_ids = torch.full((1, 1), self.start, dtype=torch.long, device=input_ids.device)
            answer_mask = torch.ones_like(answer_ids)
        count = answer_ids.shape[0]
        return self.vlm(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.expand(count, -1, -1)),
                        attention_mask=attention_mask.expand(count, -1), decoder_input_ids=answer_ids,
                        decoder_attention_mask=answer_mask).logits


class Florence2Family(ChatVLM):
    family = "florence2"
    layer_reason = LAYER_REASON
    uses_chat_template = False  # the processor lays out image tokens, <s>, the prompt and </s>
    default_prompt = "<CAPTION>"
    question_prompt = "{question}"
    image_tokens_in_text = False  # TAM: the decoded sequence holds no image tokens

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        self._grid: tuple[int, int] | None = None
        super().__init__(model, tokenizer, image_processor, name, processor)
        h, w = self.vision_grid()
        laid_out = getattr(processor, "num_image_tokens", None)
        if laid_out is not None and int(laid_out) != 1 + h * w:
            raise ValueError(f"the processor lays out {laid_out} image tokens; the model makes 1 + {h}x{w} = "
                             f"{1 + h * w} (a pooled token and the {h}x{w} grid): image_seq_length does not match "
                             "the image size")

    # ------------------------------------------------------------------ the model's parts
    @property
    def language_model(self) -> nn.Module:
        """The BART decoder (the text's positions)."""
        return self.vlm.model.language_model.get_decoder()

    def preset_layer(self) -> str:
        return resolve_layer(self.vlm, last_stage_blocks(self.vision_tower)[-1][1])[0]

    def vision_grid(self) -> tuple[int, int]:
        """The last stage's grid: the processor's square input through the stages' patch
        embeddings (convolutions: kernel, stride, padding from the vision config)."""
        if self._grid is None:
            h, w = self.processor.geometry((self.probe_image().height, self.probe_image().width)).input_size
            config = self.vlm.config.vision_config
            for kernel, stride, pad in zip(config.patch_size, config.patch_stride, config.patch_padding):
                h, w = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
            self._grid = (int(h), int(w))
        return self._grid

    def resolve_layer(self, layer: nn.Module | str | None) -> nn.Module | str:
        """A layer of the DaViT, the projector or the BART encoder; the decoder's positions are the
        text's, with no image grid to map."""
        spec = self.default_layer if layer is None else layer
        module = spec if isinstance(spec, nn.Module) else resolve_layer(self.vlm, spec)[1]
        text = [self.language_model, self.vlm.get_output_embeddings()]
        if any(module is m for part in text if part is not None for m in part.modules()):
            raise ValueError(f"layer {spec if isinstance(spec, str) else type(spec).__name__} is in Florence-2's text "
                             "decoder, whose positions are the text's (no image grid to map); name a layer of the "
                             f"DaViT (the preset: {self.default_layer}) or of the BART encoder (model.language_model"
                             ".encoder: the image grid's tokens are its first positions)")
        return super().resolve_layer(layer)

    def in_language_model(self, layer: nn.Module | str | None) -> bool:
        self.resolve_layer(layer)  # refuses a layer of the decoder: every other layer runs once per image
        return False

    def _tokens_to_grid(self, tensor: torch.Tensor, lead: int) -> torch.Tensor:
        """A DaViT layer's (..., B, C, h, w) map as it is; tokens as the base reads them (the BART
        encoder's sequence at the image grid's positions, the projector's tokens after the pooled one)."""
        if tensor.dim() == lead + 3:
            return tensor
        return super()._tokens_to_grid(tensor, lead)

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> AttentionGraph:
        """The decoder's self-attention and its cross-attention to the encoder's outputs, whose image
        columns are the grid's positions (the pooled token and the prompt left out)."""
        layers = attention_modules(self.language_model, {"self_attn": "self", "encoder_attn": "cross"})
        return AttentionGraph(layers, self.image_token_grid(), self.image_columns(inputs),
                              context=partial(eager_attention, self.vlm))

    # ------------------------------------------------------------------ the prompt and the decoder's text
    def prompt_text(self, text: str) -> str:
        return text  # the processor maps a task token to its prompt and adds the image tokens, <s> and </s>

    def _special_tokens(self, text: str) -> dict:
        return {}  # the processor places <s> and </s> itself

    def set_prompt(self, prompt: str) -> None:
        if isinstance(prompt, str) and prompt.strip():
            self.prompt_ids(prompt)  # the processor refuses a task token with other text
        super().set_prompt(prompt)

    def reply_tokens(self, reply: str) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """``reply`` as the decoder reads it (``<s> reply </s>``, offsets within ``reply``)."""
        encoded = self.tokenizer(reply, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        specials = set(self.tokenizer.all_special_ids)
        return ids, [tuple(o) for o in encoded["offset_mapping"]], [i in specials for i in ids]

    @property
    def decoder_start(self) -> int:
        return decoder_start_token(self.vlm)


@register_adapter("captioning", model_type="florence2", model_class="Florence2ForConditionalGeneration")
class Florence2Captioner(Florence2Family, HFCaptioner):
    """The caption as the decoder's output after ``</s> <s>``, the encoder reading the image tokens
    and the task prompt."""

    input_key = "decoder_input_ids"
    mask_key = "decoder_attention_mask"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        super().__init__(model, tokenizer, image_processor, name, processor)
        self.decoder_start_id = self.decoder_start

    def encoder_prompt(self, rows: int) -> dict[str, torch.Tensor]:
        """The encoder's ids (image tokens, <s>, the prompt, </s>) and mask, ``rows`` copies."""
        ids = torch.tensor([self.prompt_ids(self.prompt)] * rows, device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_inputs(self, pixel_values: torch.Tensor, tokens: Sequence[Any]) -> dict[str, torch.Tensor]:
        return {**super().batch_inputs(pixel_values, tokens), **self.encoder_prompt(len(tokens))}

    def generation_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_values, **self.encoder_prompt(len(pixel_values))}


@register_adapter("vqa", model_type="florence2", model_class="Florence2ForConditionalGeneration")
class Florence2VQA(Florence2Family, ChatVQA):
    """The question as the encoder's prompt; each candidate answer a decoder row ``</s> <s> answer``."""

    def engine_model(self, model: nn.Module) -> nn.Module:
        return EncodedPromptDecoder(model)

    @property
    def sequence_module(self) -> nn.Module:
        return self.model  # its input_ids are the encoder's sequence

    def reply_offset(self, inputs: Mapping[str, torch.Tensor]) -> int:
        return 0  # the decoder's rows (and generate's output) hold the answer alone

    def reply_prefix(self) -> list[int]:
        return [self.decoder_start, int(self.tokenizer.bos_token_id)]
