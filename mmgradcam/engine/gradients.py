"""Target scores and their gradients with respect to captured tensors."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

Target = Callable[[Any], torch.Tensor]
BATCHED_MODES = ("auto", True, False)


def check_targets(targets: Any) -> list[Target]:
    if callable(targets) and not isinstance(targets, (list, tuple)):
        raise TypeError("targets must be a sequence of callables (wrap a single target in a list)")
    try:
        targets = list(targets)
    except TypeError:
        raise TypeError(f"targets must be a sequence of callables, got {type(targets).__name__}") from None
    if not targets:
        raise ValueError("targets is empty: give at least one callable output -> Tensor of shape (B,)")
    for i, target in enumerate(targets):
        if not callable(target):
            raise TypeError(f"targets[{i}] is a {type(target).__name__}, not a callable output -> Tensor (B,)")
    return targets


def target_scores(targets: Sequence[Target], output: Any, batch: int | None) -> torch.Tensor:
    """Stack each target's (B,) score into a (T, B) tensor, checking every shape."""
    scores = []
    for i, target in enumerate(targets):
        score = target(output)
        if not isinstance(score, torch.Tensor):
            raise TypeError(f"targets[{i}] returned a {type(score).__name__}; expected a Tensor of shape (B,)")
        if score.dim() == 0 and batch in (None, 1):
            score = score.reshape(1)
        expected = (batch,) if batch is not None else (score.shape[0],) if score.dim() == 1 else None
        if score.dim() != 1 or (expected is not None and tuple(score.shape) != expected):
            raise ValueError(
                f"targets[{i}] returned shape {tuple(score.shape)}; each target must map the model "
                f"output to a tensor of shape (B,) = {expected or '(B,)'}"
            )
        scores.append(score)
    shapes = {s.shape for s in scores}
    if len(shapes) > 1:
        raise ValueError(f"targets returned different batch sizes: {sorted(s[0] for s in shapes)}")
    return torch.stack(scores)


def _loop_grads(scores: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    per_target = []
    for t in range(scores.shape[0]):
        per_target.append(torch.autograd.grad(
            scores[t].sum(), tensors, retain_graph=True, allow_unused=True, materialize_grads=True
        ))
    return [torch.stack([g[i] for g in per_target]) for i in range(len(tensors))]


def _batched_grads(scores: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    num_targets = scores.shape[0]
    # grad_outputs[t] selects target t for every sample: samples are independent, so summing
    # over the batch gives each sample's own gradient.
    selector = torch.eye(num_targets, dtype=scores.dtype, device=scores.device)
    grad_outputs = selector[:, :, None].expand(num_targets, num_targets, scores.shape[1])
    grads = torch.autograd.grad(
        scores, tensors, grad_outputs=grad_outputs, is_grads_batched=True,
        retain_graph=True, allow_unused=True, materialize_grads=True,
    )
    return list(grads)


def target_gradients(scores: torch.Tensor, tensors: Sequence[torch.Tensor],
                     batched: bool | str = "auto") -> list[torch.Tensor]:
    """d scores[t].sum() / d tensor for every target t: one (T, *tensor.shape) tensor per input.

    ``batched``: True backpropagates all T targets in one vmapped backward
    (``is_grads_batched``), False loops over targets, "auto" tries the batched path and falls
    back to the loop when some op in the graph has no batching rule. Both give the same numbers.
    """
    if batched not in BATCHED_MODES:
        raise ValueError(f"batched must be one of {BATCHED_MODES}, got {batched!r}")
    if not scores.requires_grad:
        raise RuntimeError(
            "the target scores do not depend on the captured layer (no gradient path): "
            "is the layer upstream of the output the targets read?"
        )
    if batched is False or scores.shape[0] == 1:
        return _loop_grads(scores, tensors)
    try:
        return _batched_grads(scores, tensors)
    except (RuntimeError, NotImplementedError) as error:
        if batched is True:
            raise
        warnings.warn(
            f"batched backward over {scores.shape[0]} targets failed ({str(error).splitlines()[0]}); "
            "falling back to one backward per target",
            stacklevel=3,
        )
        return _loop_grads(scores, tensors)
