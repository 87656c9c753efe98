"""Capturing layer outputs with forward hooks so gradients can be taken with respect to them."""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

OutputIndex = int | str | None


def select_tensor(output: Any, index: OutputIndex = None) -> torch.Tensor:
    """The activation tensor inside a layer output (tensor, tuple/list or ModelOutput/dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if index is None:
            key = "last_hidden_state" if "last_hidden_state" in output else next(iter(output))
        elif isinstance(index, str):
            key = index
        else:
            key = list(output.keys())[index]
        value = output[key]
    elif isinstance(output, (tuple, list)):
        value = output[0 if index is None else index]
    else:
        raise TypeError(f"cannot find a tensor in a layer output of type {type(output).__name__}")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"layer output element {index!r} is a {type(value).__name__}, not a tensor")
    return value


def replace_tensor(output: Any, new: torch.Tensor, index: OutputIndex = None) -> Any:
    """``output`` with the tensor ``select_tensor`` finds replaced by ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, Mapping):
        if index is None:
            key = "last_hidden_state" if "last_hidden_state" in output else next(iter(output))
        elif isinstance(index, str):
            key = index
        else:
            key = list(output.keys())[index]
        if hasattr(output, "__setitem__"):
            output[key] = new  # a ModelOutput is rebuilt by every forward, so updating it is safe
            return output
        return {**output, key: new}
    position = 0 if index is None else index
    items = list(output)
    items[position] = new
    return type(output)(items) if isinstance(output, list) else tuple(items)


class ActivationCapture:
    """Forward hooks on ``modules`` that record each one's output during a forward pass.

    An output that does not require grad (frozen weights, input without grad) is taken as a
    detached leaf that does, so the gradient can still be taken with respect to it; gradients are
    only ever taken with respect to these captured tensors, so nothing below the layer is
    differentiated. Hooks are removed on exit, also on exceptions.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], output_index: OutputIndex = None):
        self.modules = list(modules)
        self.output_index = output_index
        self.records: dict[str, list[torch.Tensor]] = {name: [] for name, _ in self.modules}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            tensor = select_tensor(output, self.output_index)
            if not tensor.requires_grad:
                tensor = tensor.detach().requires_grad_(True)
            self.records[name].append(tensor)
            # The model goes on with a copy, so in-place ops after the layer (ResNet's
            # `out += identity`, inplace ReLUs) cannot change what was captured.
            return replace_tensor(output, tensor.clone(), self.output_index)

        return hook

    def __enter__(self) -> "ActivationCapture":
        try:
            for name, module in self.modules:
                # first among the module's hooks: a model's own hooks that record the layer's output
                # (transformers' hidden states, which LLaVA's projector reads) see the captured tensor
                self._handles.append(module.register_forward_hook(self._hook(name), prepend=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def activation(self, name: str) -> torch.Tensor:
        """The layer's output from the forward pass (its last call if it ran several times)."""
        calls = self.records[name]
        if not calls:
            raise RuntimeError(
                f"layer {name!r} was never called during the forward pass; pick a layer the model "
                "actually runs for these inputs"
            )
        if len(calls) > 1:
            warnings.warn(
                f"layer {name!r} ran {len(calls)} times in one forward pass; explaining its last call",
                stacklevel=3,
            )
        return calls[-1]
