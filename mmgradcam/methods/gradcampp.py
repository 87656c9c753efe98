from __future__ import annotations

import torch

from ..engine.registry import CAMMethod, register


@register
class GradCAMPlusPlus(CAMMethod):
    """Grad-CAM++ (Chattopadhyay et al.), with the exponential-score closed form for alpha."""

    name = "gradcam++"
    eps = 1e-7

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        grads2 = gradients.pow(2)
        grads3 = grads2 * gradients
        activation_sum = activations.sum(dim=(-2, -1), keepdim=True).unsqueeze(0)
        alpha = grads2 / (2 * grads2 + activation_sum * grads3 + self.eps)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (alpha * gradients.clamp(min=0)).sum(dim=(-2, -1), keepdim=True)
