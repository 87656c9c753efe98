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
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmgradcam.engine.attention import AttentionGraph, AttentionLayer
from mmgradcam.engine.layouts import FunctionLayout
from mmgradcam.targets import logits_of

from .common import register_adapter
from .geometry import AxisAligned, ImageLike
from .hf import HFAdapter, last_block_name
from .vqa import ClassifierVQA


class SigmoidLogProb:
    """log sigmoid(logit) of one answer: ViLT scores answers independently (binary cross-entropy)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, output: Any) -> torch.Tensor:
        return F.logsigmoid(logits_of(output)[:, self.index])


def _output_attentions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """ViltSelfAttention returns its probabilities only when asked (its third argument)."""
    if len(args) >= 3:
        return (*args[:2], True, *args[3:]), kwargs
    return args, {**kwargs, "output_attentions": True}


@register_adapter("vqa", model_type="vilt", model_class="ViltForQuestionAnswering")
class ViltVQA(HFAdapter, ClassifierVQA):
    family = "vilt"
    layer_reason = ("the second-to-last block: the classifier reads only the first token, so the last "
                    "block's image tokens get no gradient")

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "vilt"):
        super().__init__(model, tokenizer, image_processor, name)
        self.default_layer = last_block_name(model, model.vilt, from_end=2)
        self.set_answers([model.config.id2label[i] for i in range(len(model.config.id2label))])
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
            with super().forward_context():  # the precision
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

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> AttentionGraph:
        """ViLT is single-stream: text tokens, then the image CLS and the sampled patches, in one
        self-attention per block (asked for its probabilities during the call). The patches sit on
        the grid by the patch index recorded in ``forward_context``."""
        text = int(inputs["input_ids"].shape[1])
        layers = [AttentionLayer(m, "joint", pre_hook=_output_attentions)
                  for m in self.model.vilt.encoder.modules() if type(m).__name__ == "ViltSelfAttention"]
        return AttentionGraph(layers, self._grid, slice(text + 1, None), placement=self._patches_to_grid)

    def _patches_to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """(T, B, N) values of the sampled patches -> (T, B, h, w) on ViLT's patch grid."""
        h, w = self._grid
        index = (self._patch_index[..., 0] * w + self._patch_index[..., 1]).to(values.device)  # (B, N)
        grid = values.new_zeros(*values.shape[:-1], h * w)
        grid = grid.scatter(-1, index.expand_as(values), values)
        return grid.reshape(*values.shape[:-1], h, w)

    def answer_rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The classifier reads the pooled first token ([CLS])."""
        rows = torch.zeros(inputs["input_ids"].shape[1], device=inputs["input_ids"].device)
        rows[0] = 1.0
        return rows

    def prepare(self, image: ImageLike, text: str) -> tuple[dict[str, torch.Tensor], AxisAligned]:
        inputs, geometry = self.question_inputs(image, text, self.model.config.max_position_embeddings)
        self._text_length = int(inputs["input_ids"].shape[1])  # image tokens start after the text
        return inputs, geometry

    def logprob_target(self, index: int) -> SigmoidLogProb:
        return SigmoidLogProb(index)

    def probabilities_of(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)  # answers are scored independently
