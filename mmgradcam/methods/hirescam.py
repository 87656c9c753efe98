from __future__ import annotations

import torch

from ..engine.registry import CAMMethod, register


@register
class HiResCAM(CAMMethod):
    """HiResCAM (Draelos & Carin): gradients times activations elementwise, summed over channels."""

    name = "hirescam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients
