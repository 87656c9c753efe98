"""Guided Grad-CAM (Selvaraju et al.): Guided Backprop times the upsampled Grad-CAM map.

The one fusion rule, used by ``mg.guided_gradcam``, ``explain(..., method="guided-gradcam")`` and
so by captioning, VQA and eval alike: fused = GB (T, B, C, H, W) * Grad-CAM map (T, B, 1, H, W),
the paper's elementwise product. Its per-pixel map (what tasks show as ``guided_maps`` and eval
scores) is the largest |fused| over the image's colour channels, the usual way to show a pixel
gradient as one heatmap (Simonyan et al.): a sign per colour channel says nothing about where.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..engine.explain import explain
from ..engine.gradients import Target
from ..engine.inputs import Inputs
from ..engine.registry import PixelMethod, register
from .input_gradients import guided_backprop


@register
class GuidedGradCAM(PixelMethod):
    name = "guided-gradcam"
    base = "gradcam"

    def input_pass(self, model: nn.Module, inputs: Inputs, targets: Sequence[Target], *, image_key: str | None,
                   batched: bool | str, eval_mode: bool, max_targets_per_backward: int | None = None,
                   ) -> torch.Tensor:
        return guided_backprop(model, inputs, targets, image_key=image_key, batched=batched, eval_mode=eval_mode,
                               max_targets_per_backward=max_targets_per_backward)

    def fuse(self, pixels: torch.Tensor, cam_maps: torch.Tensor) -> torch.Tensor:
        return pixels * cam_maps.unsqueeze(2)

    def pixel_map(self, fused: torch.Tensor) -> torch.Tensor:
        return fused.abs().amax(dim=2)


def guided_gradcam(model: nn.Module, inputs: Inputs, targets: Sequence[Target], layer: nn.Module | str,
                   method: str = "gradcam", *, image_key: str | None = None, batched: bool | str = "auto",
                   eval_mode: bool = True, max_targets_per_backward: int | None = None,
                   **explain_kwargs) -> torch.Tensor:
    """(T, B, C, H, W): ``GuidedGradCAM.fuse`` of Guided Backprop and ``method``'s (unnormalized)
    CAM map; ``explain(..., method="guided-gradcam").pixel_maps`` is its per-pixel map."""
    rule = GuidedGradCAM()
    guided = rule.input_pass(model, inputs, targets, image_key=image_key, batched=batched, eval_mode=eval_mode,
                             max_targets_per_backward=max_targets_per_backward)
    maps = explain(model, inputs, targets, layer, method, image_key=image_key, batched=batched, eval_mode=eval_mode,
                   max_targets_per_backward=max_targets_per_backward, **explain_kwargs).upsample(guided.shape[-2:])
    return rule.fuse(guided, maps.to(guided.device))
