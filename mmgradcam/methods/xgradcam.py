from __future__ import annotations

import torch

from ..engine.registry import CAMMethod, register


@register
class XGradCAM(CAMMethod):
    """XGrad-CAM (Fu et al.): gradients weighted by the normalized activations."""

    name = "xgradcam"
    eps = 1e-7

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        acts = activations.unsqueeze(0)
        total = acts.sum(dim=(-2, -1), keepdim=True)
        return (gradients * acts).sum(dim=(-2, -1), keepdim=True) / (total + self.eps)
