from __future__ import annotations

import torch

from ..engine.registry import CAMMethod, register


@register
class LayerCAM(CAMMethod):
    """LayerCAM (Jiang et al.): positive gradients as per-location weights."""

    name = "layercam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.clamp(min=0)
