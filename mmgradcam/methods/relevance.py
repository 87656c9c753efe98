"""Generic attention-model relevance (Chefer, Gur, Wolf, ICCV 2021)."""
from __future__ import annotations

import torch

from ..engine.registry import AttentionMethod, register


def _weighted(probs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Ā = mean over heads of clamp(∇A ⊙ A, min=0): (T, B, q, k)."""
    return (grads * probs.unsqueeze(0)).clamp(min=0).mean(dim=2)


def _residual_normalized(r: torch.Tensor) -> torch.Tensor:
    """R̄ = row-normalize(R − I) + I (the paper's normalization before a co-attention update)."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    rest = r - eye
    sums = rest.sum(dim=-1, keepdim=True)
    return torch.where(sums > 0, rest / sums.clamp(min=1e-12), rest) + eye


@register
class Relevance(AttentionMethod):
    """Relevance maps start as identities and are updated layer by layer in forward order:
    text self-attention R^tt ← R^tt + Ā·R^tt, R^ti ← R^ti + Ā·R^ti; cross-attention (text rows,
    image columns) R^ti ← R^ti + (R̄^tt)ᵀ·Ā·R̄^ii with R^ii = I (the image encoder is not
    traversed); a joint (single-stream) self-attention R ← R + Ā·R over the whole sequence. The map
    is the target's readout rows of R over the image tokens."""

    name = "relevance"

    def layer_map(self, computed) -> torch.Tensor:
        if computed.graph.joint:
            return self._joint(computed)
        stages = sorted({layer.stage for layer in computed.graph.layers}) if computed.graph.layers else [0]
        if len(stages) == 1:
            return computed.to_grid(computed.read_rows(self._decoder(computed.kinds, computed.probabilities,
                                                                     computed.gradients)))
        return self._staged(computed, stages)

    def _staged(self, computed, stages: list[int]) -> torch.Tensor:
        """Stage s's cross-attention reads stage s - 1's text rows: the relevance of the last stage's
        rows to the image is R^{(last)} · ... · R^{(0)} (each stage's R^ti by the decoder rule). A
        later stage may batch several rows per sample (BLIP VQA: one per candidate answer); only a
        target's own row has gradient, so the rows are summed."""
        chain = None
        for stage in stages:
            picked = [i for i, layer in enumerate(computed.graph.layers) if layer.stage == stage]
            r = self._decoder([computed.kinds[i] for i in picked], [computed.probabilities[i] for i in picked],
                              [computed.gradients[i] for i in picked])  # (T, B_s, rows_s, keys_s)
            r = r.sum(dim=1, keepdim=True) if stage else r
            chain = r if chain is None else r @ chain
        return computed.to_grid(computed.read_rows(chain))

    @staticmethod
    def _joint(computed) -> torch.Tensor:
        r = None
        for probs, grads in zip(computed.probabilities, computed.gradients):
            a = _weighted(probs, grads)
            if r is None:
                r = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a).clone()
            r = r + a @ r
        return computed.to_grid(computed.read_rows(r, computed.graph.text_offset))

    @staticmethod
    def _decoder(kinds, probabilities, gradients) -> torch.Tensor:
        """R^ti (T, B, text, image) of self- and cross-attention layers in forward order."""
        r_tt = r_ti = None
        for kind, probs, grads in zip(kinds, probabilities, gradients):
            a = _weighted(probs, grads)
            if r_tt is None:
                t, b, q = a.shape[:3]
                r_tt = torch.eye(q, dtype=a.dtype, device=a.device).expand(t, b, q, q).clone()
            if kind == "self":
                r_tt, r_ti = r_tt + a @ r_tt, None if r_ti is None else r_ti + a @ r_ti
            else:  # cross: Ā is (T, B, text, image); R̄^ii = I
                update = _residual_normalized(r_tt).transpose(-1, -2) @ a
                r_ti = update if r_ti is None else r_ti + update
        if r_ti is None:
            raise ValueError("relevance needs at least one cross-attention layer")
        return r_ti
