"""BLIP (transformers): BlipForConditionalGeneration captioning and BlipForQuestionAnswering VQA.

Preset layer: the vision encoder's last block. The text decoder cross-attends to every image
token of its output, so the patch tokens there carry gradient (unlike a CLS-only classifier).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


import torch
from torch import nn

from mmgradcam.engine.attention import AttentionGraph

from mmgradcam.engine import preserved_state

from .common import register_adapter
from .geometry import ImageLike
from .hf import attention_modules, decoder_graph, HFAdapter, HFCaptioner, last_block_name
from .vqa import VQAModel

LAYER_REASON = "the vision encoder's last block: the text decoder cross-attends to all its patch tokens"


@register_adapter("captioning", model_type="blip", model_class="BlipForConditionalGeneration")
class BlipCaptioner(HFCaptioner):
    family = "blip"
    layer_reason = LAYER_REASON

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "blip"):
        super().__init__(model, tokenizer, image_processor, name)
        self.default_layer = last_block_name(model, model.vision_model)
        self.bos_id = int(model.config.text_config.bos_token_id)

    def _max_tokens(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> AttentionGraph:
        """The text decoder's self-attention and its cross-attention to the ViT's tokens."""
        return decoder_graph(self.model, self.model.text_decoder, self.model.config.vision_config,
                             {"attention.self": "self", "crossattention.self": "cross"})

    def prepare_ids(self, ids, offsets, special):
        # BLIP decodes from [DEC] (the text config's BOS) in place of the tokenizer's [CLS]
        if special and special[0]:
            ids = [self.bos_id] + ids[1:]
        else:
            ids, offsets, special = [self.bos_id] + ids, [(0, 0)] + offsets, [True] + special
        return ids, offsets, special


# ----------------------------------------------------------------------------- VQA (generative)
class BlipAnswerScorer(nn.Module):
    """BLIP VQA as one differentiable forward: vision -> question encoder -> answer decoder.

    ``BlipForQuestionAnswering.forward`` returns no logits, so this runs its three parts and
    returns the decoder's logits (K, L, V) for K candidate answers, all reading one image and
    one question (the image and question are encoded once)."""

    def __init__(self, blip: nn.Module):
        super().__init__()
        self.blip = blip

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        image = self.blip.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        question = self.blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                          encoder_hidden_states=image, encoder_attention_mask=image_mask)[0]
        count = answer_ids.shape[0]
        decoded = self.blip.text_decoder(input_ids=answer_ids, attention_mask=answer_mask,
                                         encoder_hidden_states=question.expand(count, -1, -1),
                                         encoder_attention_mask=attention_mask.expand(count, -1))
        return decoded.logits


class AnswerRowLogProb:
    """Target: sum of log p(answer token) over one candidate's tokens (row ``row`` of the
    decoder batch), as a (1,) score for the one image."""

    def __init__(self, row: int, positions: list[tuple[int, int]]):
        self.row, self.positions = row, positions

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits[self.row].float(), dim=-1)
        return sum(logprobs[pos, tok] for pos, tok in self.positions).reshape(1)


@register_adapter("vqa", model_type="blip", model_class="BlipForQuestionAnswering")
class BlipVQA(HFAdapter, VQAModel):
    family = "blip"
    layer_reason = LAYER_REASON
    max_answer_tokens = 10

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "blip-vqa"):
        self.blip = model.eval()
        super().__init__(BlipAnswerScorer(self.blip), tokenizer, image_processor, name)
        self.default_layer = last_block_name(model, model.vision_model)
        self.bos_id = int(model.config.text_config.bos_token_id)
        self._generated: dict[str, list[int]] = {}

    @property
    def layer_root(self) -> nn.Module:
        return self.blip

    def prepare(self, image: ImageLike, text: str) -> tuple[dict[str, torch.Tensor], Any]:
        inputs, geometry = self.question_inputs(image, text, self.blip.config.text_config.max_position_embeddings)
        # the answer scorer's forward takes exactly these (no token_type_ids)
        return {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask")}, geometry

    def _answer_ids(self, answer: str) -> list[int]:
        """[DEC] answer tokens [SEP]; a generated candidate keeps the ids it was generated with
        (decoding and re-tokenizing need not give the same tokens back)."""
        if answer in self._generated:
            return self._generated[answer]
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"answer {answer!r} is empty")
        ids = self.tokenizer(answer)["input_ids"]
        if self.tokenizer.unk_token_id in ids:
            raise ValueError(f"answer {answer!r} has words the model's tokenizer does not know")
        return [self.bos_id] + ids[1:]

    def _answer_rows(self, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
        rows = [self._answer_ids(a) for a in answers]
        specials = set(self.tokenizer.all_special_ids) | {self.bos_id}
        positions = [[(t - 1, r[t]) for t in range(1, len(r)) if r[t] not in specials] for r in rows]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        answer_ids = torch.full((len(rows), length), pad, dtype=torch.long, device=self.device)
        answer_mask = torch.zeros((len(rows), length), dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            answer_ids[i, :len(r)] = torch.tensor(r, device=self.device)
            answer_mask[i, :len(r)] = 1
        return answer_ids, answer_mask, positions

    def targets_for(self, inputs, answers, score):
        answer_ids, answer_mask, positions = self._answer_rows(answers)
        return ({**inputs, "answer_ids": answer_ids, "answer_mask": answer_mask},
                [AnswerRowLogProb(i, p) for i, p in enumerate(positions)])

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> AttentionGraph:
        """Two stages: the question encoder (self-attention, cross-attention to the ViT's tokens),
        then the answer decoder (self-attention, cross-attention to the question's tokens)."""
        question = {"attention.self": "self", "crossattention.self": "cross"}
        graph = decoder_graph(self.blip, self.blip.text_encoder, self.blip.config.vision_config, question)
        answer = attention_modules(self.blip.text_decoder, question)
        for layer in answer:
            layer.stage = 1
        mask = inputs["attention_mask"][0].float()
        graph.layers += answer
        graph.stage_rows = mask / mask.sum()  # attention-gradcam: the question's tokens, as LAVIS's ITM map
        return graph

    def answer_readout(self, inputs: Mapping[str, torch.Tensor], targets: Sequence[Any]) -> torch.Tensor:
        """Each candidate's map is read at the decoder positions that score its tokens."""
        readout = torch.zeros(len(targets), 1, inputs["answer_ids"].shape[1], device=inputs["answer_ids"].device)
        for t, target in enumerate(targets):
            positions = getattr(target, "positions", None)
            if not positions:
                raise ValueError("the attention methods explain answers (not a contrast) on BLIP VQA")
            for pos, _ in positions:
                readout[t, 0, pos] += 1.0 / len(positions)
        return readout

    def answer_target(self, answer: str, score: str = "logit"):
        raise NotImplementedError("BLIP VQA targets depend on the candidate batch: use targets_for")

    def answer_probabilities(self, inputs, answers: Sequence[str]) -> list[float]:
        """exp(sum of the answer tokens' log-probabilities) for each answer."""
        base = {k: v for k, v in inputs.items() if k not in ("answer_ids", "answer_mask")}
        full, targets = self.targets_for(base, answers, "logprob")
        with torch.no_grad(), preserved_state(self.model), self.forward_context():
            logits = self.model(**self.to_device(full))
        return [float(torch.exp(t(logits))) for t in targets]

    def ranked_answers(self, inputs, top_k: int) -> list[tuple[str, float]]:
        """Beam-searched candidate answers, ranked by their teacher-forced probability."""
        base = self.to_device({k: v for k, v in inputs.items() if k not in ("answer_ids", "answer_mask")})
        beams = max(top_k, 1)
        with torch.no_grad(), preserved_state(self.blip), self.forward_context():
            ids = self.blip.generate(input_ids=base["input_ids"], attention_mask=base["attention_mask"],
                                     pixel_values=base["pixel_values"], num_beams=beams, num_return_sequences=beams,
                                     max_new_tokens=self.max_answer_tokens, use_cache=self.generation_cache)
        specials = set(self.tokenizer.all_special_ids) | {self.bos_id}
        for row in ids.tolist():
            content = [i for i in row if i not in specials]
            text = self.tokenizer.decode(content).strip()
            if text and text not in self._generated:
                self._generated[text] = [self.bos_id] + content + [self.tokenizer.sep_token_id]
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        candidates = list(dict.fromkeys(t for t in texts if t and t in self._generated))
        if not candidates:
            return []
        scored = zip(candidates, self.answer_probabilities(base, candidates))
        return sorted(scored, key=lambda pair: pair[1], reverse=True)[:top_k]
