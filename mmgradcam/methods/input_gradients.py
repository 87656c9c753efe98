"""Pixel-space attributions: vanilla input gradient, Guided Backprop, Deconvolution."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..engine.gradients import Target, check_max_targets, check_targets, target_gradients, target_scores
from ..engine.inputs import Inputs, call_model, image_of, with_image
from ..engine.relu import ReLUBackwardRule
from ..engine.state import preserved_state


def _input_gradients(model: nn.Module, inputs: Inputs, targets: Sequence[Target], relu_rule: str | None,
                     *, image_key: str | None = None, batched: bool | str = "auto",
                     eval_mode: bool = True, max_targets_per_backward: int | None = None) -> torch.Tensor:
    """(T, B, C, H, W) gradient of each target with respect to the image input."""
    check_max_targets(max_targets_per_backward)
    targets = check_targets(targets)
    image = image_of(inputs, image_key).detach().clone().requires_grad_(True)
    model_inputs = with_image(inputs, image, image_key)
    rule = ReLUBackwardRule(relu_rule) if relu_rule else contextlib.nullcontext()
    with preserved_state(model, eval_mode), torch.inference_mode(False), torch.enable_grad():
        with rule:
            output = call_model(model, model_inputs)
        scores = target_scores(targets, output, int(image.shape[0]))
        (gradients,) = target_gradients(scores, [image], batched, max_targets_per_backward)
    if relu_rule and rule.calls == 0:
        warnings.warn(f"{relu_rule}: the model made no ReLU call, so this is the plain input gradient",
                      stacklevel=3)
    return gradients.detach()


def input_gradient(model: nn.Module, inputs: Inputs, targets: Sequence[Target], **kwargs) -> torch.Tensor:
    """Vanilla gradient (saliency): d target / d image, (T, B, C, H, W)."""
    return _input_gradients(model, inputs, targets, None, **kwargs)


def guided_backprop(model: nn.Module, inputs: Inputs, targets: Sequence[Target], **kwargs) -> torch.Tensor:
    """Guided Backpropagation (Springenberg et al.), (T, B, C, H, W)."""
    return _input_gradients(model, inputs, targets, "guided", **kwargs)


def deconvolution(model: nn.Module, inputs: Inputs, targets: Sequence[Target], **kwargs) -> torch.Tensor:
    """Deconvolution (Zeiler & Fergus): ReLUs pass back the positive gradient, (T, B, C, H, W)."""
    return _input_gradients(model, inputs, targets, "deconv", **kwargs)
