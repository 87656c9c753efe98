"""Attention × gradient at a cross-attention layer (LAVIS's BLIP Grad-CAM), per target."""
from __future__ import annotations

import torch

from ..engine.registry import AttentionMethod, register


@register
class AttentionGradCAM(AttentionMethod):
    """mean over heads of A ⊙ max(∂y/∂A, 0) at the last layer that reads the image (the last
    cross-attention, or the last joint self-attention of a single-stream model), read at the
    target's text rows and the image-token columns."""

    name = "attention-gradcam"

    @staticmethod
    def _layer(computed) -> int:
        kinds = computed.kinds
        wanted = "joint" if "joint" in kinds else "cross"
        if wanted not in kinds:
            raise ValueError("attention-gradcam needs a cross-attention or joint self-attention layer")
        return len(kinds) - 1 - kinds[::-1].index(wanted)

    def layer_map(self, computed) -> torch.Tensor:
        index = self._layer(computed)
        probs, grads = computed.probabilities[index], computed.gradients[index]  # (B,h,q,k), (T,B,h,q,k)
        weighted = (probs.unsqueeze(0) * grads.clamp(min=0)).mean(dim=2)  # (T, B, q, k)
        offset = computed.graph.text_offset if computed.kinds[index] == "joint" else 0
        return computed.to_grid(computed.read_rows(weighted, offset))

    def layer_name(self, computed) -> str:
        return f"attention[{self._layer(computed)}]"
