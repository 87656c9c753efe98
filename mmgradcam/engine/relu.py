"""Changing how ReLUs pass gradients back (Guided Backprop, Deconvolution) without editing the model.

A TorchFunctionMode intercepts every ReLU call made during the forward pass, whether from an
``nn.ReLU`` module (which calls ``F.relu``) or a functional ``F.relu`` / ``torch.relu`` /
``Tensor.relu`` in the model's code, and swaps in a ReLU whose backward rule is changed by a
tensor hook. Only tensors made inside the forward pass get hooks, so nothing of the model is
touched and the rule is vmap-friendly (batched backward works).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, torch.Tensor.relu, torch.Tensor.relu_}
RELU_RULES = ("guided", "deconv")


def _positive_gradient(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


class ReLUBackwardRule(TorchFunctionMode):
    """``guided``: pass gradient where the input was positive AND the gradient is positive.
    ``deconv``: pass the positive part of the gradient, whatever the input was."""

    def __init__(self, rule: str):
        super().__init__()
        if rule not in RELU_RULES:
            raise ValueError(f"rule must be one of {RELU_RULES}, got {rule!r}")
        self.rule = rule
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in RELU_FUNCTIONS:
            return func(*args, **kwargs)
        self.calls += 1
        x = args[0]
        if self.rule == "guided":
            # relu's own backward masks by x > 0; the hook adds the mask on the gradient's sign.
            y = torch.relu(x)
        else:
            # Identity in backward (then clamped by the hook), relu in forward.
            y = x + (torch.relu(x) - x).detach()
        if y.requires_grad:
            y.register_hook(_positive_gradient)
        return y
