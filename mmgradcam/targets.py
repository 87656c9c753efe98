"""Targets: callables mapping a model's output to one score per sample, shape (B,)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, ``output.logits`` / ``output["logits"]``, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _gather(values: torch.Tensor, index: int | Sequence[int], name: str) -> torch.Tensor:
    if values.dim() != 2:
        raise ValueError(f"{name} expects logits of shape (B, K), got {tuple(values.shape)}")
    batch, classes = values.shape
    if isinstance(index, int):
        indices = torch.full((batch,), index, dtype=torch.long, device=values.device)
    else:
        indices = torch.as_tensor(list(index), dtype=torch.long, device=values.device)
        if indices.shape != (batch,):
            raise ValueError(f"{name}: {len(indices)} per-sample indices given for a batch of {batch}")
    if bool(((indices < -classes) | (indices >= classes)).any()):
        raise IndexError(f"{name}: class index {indices.tolist()} out of range for {classes} classes")
    return values.gather(1, (indices % classes)[:, None]).squeeze(1)


class ClassScore:
    """logits[:, index]; ``index`` an int or one index per sample."""

    def __init__(self, index: int | Sequence[int]):
        self.index = index if isinstance(index, int) else [int(i) for i in index]

    def __call__(self, output: Any) -> torch.Tensor:
        return _gather(logits_of(output), self.index, type(self).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index!r})"


class ClassLogProb(ClassScore):
    """log_softmax(logits)[:, index]; ``index`` an int or one index per sample."""

    def __call__(self, output: Any) -> torch.Tensor:
        return _gather(torch.log_softmax(logits_of(output), dim=-1), self.index, type(self).__name__)
