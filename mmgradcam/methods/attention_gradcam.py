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
        # only stage 0 reads the image (later stages read text rows)
        stages = [layer.stage for layer in computed.graph.layers] or [0] * len(computed.kinds)
        kinds = [kind if stage == 0 else "later" for kind, stage in zip(computed.kinds, stages)]
        wanted = "joint" if "joint" in kinds else "cross"
        if wanted not in kinds:
            raise ValueError("attention-gradcam needs a cross-attention or joint self-attention layer")
        return len(kinds) - 1 - kinds[::-1].index(wanted)

    def layer_map(self, computed) -> torch.Tensor:
        index = self._layer(computed)
        probs, grads = computed.probabilities[index], computed.gradients[index]  # (B,h,q,k), (T,B,h,q,k)
        weighted = (probs.unsqueeze(0) * grads.clamp(min=0)).mean(dim=2)  # (T, B, q, k)
        offset = computed.graph.text_offset if computed.kinds[index] == "joint" else 0
        stage = computed.graph.layers[index].stage if computed.graph.layers else 0
        if stage != max((layer.stage for layer in computed.graph.layers), default=0):
            # the image-reading layer is in an earlier stage (BLIP VQA's question encoder): read its rows
            rows = computed.graph.stage_rows.to(weighted)
            return computed.to_grid(torch.einsum("r,tbrn->tbn", rows, weighted[:, :1]))
        return computed.to_grid(computed.read_rows(weighted, offset))

    def layer_name(self, computed) -> str:
        return f"attention[{self._layer(computed)}]"
