from __future__ import annotations

import torch

from ..engine.registry import CAMMethod, register


@register
class GradCAM(CAMMethod):
    """Grad-CAM (Selvaraju et al.): channel weights are the spatially averaged gradients."""

    name = "gradcam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean(dim=(-2, -1), keepdim=True)
