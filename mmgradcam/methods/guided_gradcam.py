"""Guided Grad-CAM: Guided Backprop times the upsampled Grad-CAM map (the Grad-CAM paper's fusion)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..engine.explain import explain
from ..engine.gradients import Target
from ..engine.inputs import Inputs
from .input_gradients import guided_backprop


def guided_gradcam(model: nn.Module, inputs: Inputs, targets: Sequence[Target], layer: nn.Module | str,
                   method: str = "gradcam", *, image_key: str | None = None, batched: bool | str = "auto",
                   eval_mode: bool = True, **explain_kwargs) -> torch.Tensor:
    """(T, B, C, H, W): elementwise product of Guided Backprop and the (unnormalized) CAM map."""
    guided = guided_backprop(model, inputs, targets, image_key=image_key, batched=batched, eval_mode=eval_mode)
    maps = explain(model, inputs, targets, layer, method, image_key=image_key, batched=batched,
                   eval_mode=eval_mode, **explain_kwargs).upsample(guided.shape[-2:])
    return guided * maps.unsqueeze(2)
