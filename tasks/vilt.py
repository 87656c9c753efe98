"""ViLT (transformers): ViltForQuestionAnswering, a classifier over an answer vocabulary.

Preset layer: the second-to-last encoder block. The classifier reads only the first (text CLS)
token after the last block's layer norm, so the last block's image tokens get zero gradient;
one block earlier, the image tokens feed the last block's attention into that token.

ViLT puts its image tokens after the text tokens and an image CLS token, in the order of its
``patch_index`` (patches may be sampled or padded); the layout scatters them back onto the patch
grid through that index, recorded during the forward pass.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmgradcam.engine import preserved_state
from mmgradcam.engine.layouts import FunctionLayout
from mmgradcam.targets import logits_of

from .geometry import ImageLike, load_image
from .hf import ProcessorGeometry, encoder_blocks, module_name
from .vqa import VQAModel


class SigmoidLogProb:
    """log sigmoid(logit) of one answer: ViLT scores answers independently (binary cross-entropy)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, output: Any) -> torch.Tensor:
        return F.logsigmoid(logits_of(output)[:, self.index])


class AnswerLogit:
    def __init__(self, index: int):
        self.index = index

    def __call__(self, output: Any) -> torch.Tensor:
        return logits_of(output)[:, self.index]


class ViltVQA(VQAModel):
    family = "vilt"
    layer_reason = ("the second-to-last block: the classifier reads only the first token, so the last "
                    "block's image tokens get no gradient")

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "vilt"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = ProcessorGeometry(image_processor)
        self.name = name
        blocks = encoder_blocks(model.vilt)
        self.default_layer = module_name(model, blocks[-2 if len(blocks) > 1 else -1][1])
        self.answers = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        self._patch_index: torch.Tensor | None = None
        self._text_length = 0
        self._grid: tuple[int, int] = (0, 0)
        self.layer_options = {"layout": FunctionLayout(self._image_tokens_to_grid)}

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Record the patch index of ViLT's visual embedding during the forward pass.

        The embedding module's ``visual_embed`` method is wrapped on the instance for the duration
        and restored afterwards, also on errors."""
        embeddings = self.model.vilt.embeddings
        had_own = "visual_embed" in vars(embeddings)
        original = embeddings.visual_embed

        def recording(*args, **kwargs):
            x, x_mask, (patch_index, size) = original(*args, **kwargs)
            self._patch_index, self._grid = patch_index.detach(), (int(size[0]), int(size[1]))
            return x, x_mask, (patch_index, size)

        embeddings.visual_embed = recording
        try:
            yield
        finally:
            if had_own:
                embeddings.visual_embed = original
            else:
                del embeddings.visual_embed

    def _image_tokens_to_grid(self, tensor: torch.Tensor, lead: int) -> torch.Tensor:
        """(..., B, text + 1 + N, C) hidden states -> (..., B, C, h, w) on ViLT's patch grid."""
        if self._patch_index is None:
            raise RuntimeError("ViLT's patch index was not recorded: run inside forward_context()")
        image = tensor[..., self._text_length + 1:, :]
        h, w = self._grid
        index = self._patch_index[..., 0] * w + self._patch_index[..., 1]  # (B, N)
        shape = image.shape
        grid = image.new_zeros(*shape[:-2], h * w, shape[-1])
        expanded = index.reshape(*([1] * (lead - 1)), *index.shape, 1).expand(*shape[:-1], 1).expand_as(image)
        grid = grid.scatter(-2, expanded, image)  # a padded (repeated) patch lands on an existing cell
        return grid.reshape(*shape[:-2], h, w, shape[-1]).movedim(-1, lead)

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        return self.processor.normalization

    def model_inputs(self, image: ImageLike, question: str):
        if not isinstance(question, str) or not question.strip() or not any(c.isalnum() for c in question):
            raise ValueError(f"question {question!r} is empty: it has no words")
        pil = load_image(image)
        text = self.tokenizer(question, return_tensors="pt", truncation=True,
                              max_length=self.model.config.max_position_embeddings)
        unknown = self.tokenizer.unk_token_id
        ids = text["input_ids"][0]
        content = ids[~torch.tensor(self.tokenizer.get_special_tokens_mask(ids.tolist(), already_has_special_tokens=True),
                                    dtype=torch.bool)]
        if unknown is not None and len(content) and bool((content == unknown).all()):
            raise ValueError(f"question {question!r} has only words the model's tokenizer does not know")
        inputs = {**dict(text), **self.processor.pixels(pil)}
        self._text_length = int(inputs["input_ids"].shape[1])
        return inputs, self.processor.geometry((pil.height, pil.width))

    def _index(self, answer: str) -> int:
        if answer not in self.answer_index:
            raise ValueError(f"answer {answer!r} is not in the model's answer vocabulary "
                             f"({len(self.answers)} answers, e.g. {', '.join(self.answers[:10])})")
        return self.answer_index[answer]

    def answer_target(self, answer: str, score: str = "logit"):
        index = self._index(answer)
        return AnswerLogit(index) if score == "logit" else SigmoidLogProb(index)

    def _probabilities(self, inputs) -> torch.Tensor:
        with torch.no_grad(), preserved_state(self.model), self.forward_context():
            return torch.sigmoid(logits_of(self.model(**inputs)))[0]

    def ranked_answers(self, inputs, top_k: int) -> list[tuple[str, float]]:
        probabilities = self._probabilities(inputs)
        values, indices = probabilities.topk(min(top_k, len(self.answers)))
        return [(self.answers[int(i)], float(v)) for v, i in zip(values, indices)]

    def answer_probabilities(self, inputs, answers: Sequence[str]) -> list[float]:
        probabilities = self._probabilities(inputs)
        return [float(probabilities[self._index(a)]) for a in answers]
