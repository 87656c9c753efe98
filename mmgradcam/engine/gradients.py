"""Target scores and their gradients with respect to captured tensors."""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

Target = Callable[[Any], torch.Tensor]
BATCHED_MODES = ("auto", True, False)
# max_targets_per_backward=None ("auto"): off CUDA a fixed chunk (memory is rarely the limit there,
# and 64 targets keep nearly all of the batching's speed); on CUDA a first chunk of CUDA_FIRST_CHUNK
# targets is measured and the rest sized to CUDA_MEMORY_SHARE of the memory still available.
CPU_TARGETS_PER_BACKWARD = 64
CUDA_FIRST_CHUNK = 8
CUDA_MEMORY_SHARE = 0.8


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


def _loop_grads(scores: torch.Tensor, tensors: Sequence[torch.Tensor], start: int = 0) -> list[torch.Tensor]:
    """One backward per target ``start, ..., T - 1``: the fallback when the graph cannot be vmapped."""
    per_target = []
    for t in range(start, scores.shape[0]):
        per_target.append(torch.autograd.grad(
            scores[t].sum(), tensors, retain_graph=True, allow_unused=True, materialize_grads=True
        ))
    return [torch.stack([g[i] for g in per_target]) for i in range(len(tensors))]


def _batched_grads(scores: torch.Tensor, tensors: Sequence[torch.Tensor], start: int = 0,
                   stop: int | None = None) -> list[torch.Tensor]:
    """Targets ``start:stop`` in one vmapped backward: one (stop - start, *tensor.shape) per tensor."""
    num_targets = scores.shape[0]
    stop = num_targets if stop is None else stop
    count = stop - start
    # grad_outputs[i] selects target start + i for every sample: samples are independent, so
    # summing over the batch gives each sample's own gradient.
    selector = torch.eye(num_targets, dtype=scores.dtype, device=scores.device)[start:stop]
    grad_outputs = selector[:, :, None].expand(count, num_targets, scores.shape[1])
    # retain_graph=True for every chunk, the last included: the next chunk, an out-of-memory retry
    # and the per-target fallback need the graph again, and a backward that fails half-way with
    # retain_graph=False leaves it half freed. Every caller drops the graph right after
    # target_gradients returns (it keeps only detached tensors), so nothing is held longer.
    grads = torch.autograd.grad(
        scores, tensors, grad_outputs=grad_outputs, is_grads_batched=True,
        retain_graph=True, allow_unused=True, materialize_grads=True,
    )
    # torch materializes the gradient of an unused tensor without the targets' dimension (a layer
    # whose output reaches nothing, e.g. a vision block after the one a projector reads)
    return [g if g.shape[1:] == t.shape and g.shape[0] == count else g.new_zeros((count, *t.shape))
            for g, t in zip(grads, tensors)]


def check_max_targets(value: Any) -> int | None:
    """``max_targets_per_backward`` as an int >= 1, or None (auto); anything else is a ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError("max_targets_per_backward must be a positive int (targets per batched backward) "
                         f"or None (auto), got {value!r}")
    return int(value)


def _cuda_chunk_size(device: torch.device, bytes_per_target: float, total: int) -> int:
    """Targets that fit in CUDA_MEMORY_SHARE of what the allocator can still get: the driver's free
    memory plus what torch holds cached but unused."""
    if bytes_per_target <= 0:
        return total
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(total, int(CUDA_MEMORY_SHARE * free / bytes_per_target)))


def _measures_cuda(device: torch.device) -> bool:
    """Whether ``device``'s memory is read through torch.cuda (a function, so tests can fake it)."""
    return device.type == "cuda"


def _chunked_grads(scores: torch.Tensor, tensors: Sequence[torch.Tensor], batched: bool | str,
                   limit: int | None) -> list[torch.Tensor]:
    """All targets in batched backwards of at most ``limit`` targets (None: auto) over the one
    graph, halving a chunk that runs out of memory; "auto" falls back to the loop when vmap fails."""
    total = scores.shape[0]
    device = scores.device
    cuda = _measures_cuda(device)
    measure = cuda and limit is None  # auto on CUDA: size the later chunks from the first one
    size = min(total, limit if limit is not None else CUDA_FIRST_CHUNK if cuda else CPU_TARGETS_PER_BACKWARD)
    first_failed: int | None = None   # the chunk size that first ran out of memory
    out: list[torch.Tensor] | None = None
    start = 0
    while start < total:
        stop = min(start + size, total)
        if measure:
            allocated = torch.cuda.memory_allocated(device)
        out_of_memory = False
        try:
            grads = _batched_grads(scores, tensors, start, stop)
        except torch.OutOfMemoryError:  # a RuntimeError: caught before the vmap fallback below
            if stop - start == 1:
                raise
            out_of_memory = True
        except (RuntimeError, NotImplementedError) as error:
            if batched is True:
                raise
            warnings.warn(
                f"batched backward over {stop - start} targets failed ({str(error).splitlines()[0]}); "
                "falling back to one backward per target",
                stacklevel=4,
            )
            grads, stop = _loop_grads(scores, tensors, start), total
        if out_of_memory:
            # retried outside the except block, so the error's frames (and tensors) are gone
            first_failed = first_failed or stop - start
            size = (stop - start) // 2
            if cuda:
                torch.cuda.empty_cache()
            continue
        if measure:
            # never resets the user's peak statistics: an earlier, higher peak only overstates
            # the increase, which makes the later chunks smaller, never too large
            increase = torch.cuda.max_memory_allocated(device) - allocated
            measure = False
        if out is None:  # filled chunk by chunk: no second copy of all gradients from a final cat
            out = [g.new_empty((total, *g.shape[1:])) for g in grads]
        for whole, part in zip(out, grads):
            whole[start:stop].copy_(part)
        del grads
        if cuda and limit is None and start == 0 and stop < total:
            size = min(_cuda_chunk_size(device, increase / (stop - start), total), size if first_failed else total)
        start = stop
    if first_failed is not None:
        warnings.warn(
            f"the batched backward ran out of memory with {first_failed} targets per backward; "
            f"it went on with {size} (max_targets_per_backward={size} skips the retries)",
            stacklevel=4,
        )
    assert out is not None
    return out


def target_gradients(scores: torch.Tensor, tensors: Sequence[torch.Tensor],
                     batched: bool | str = "auto", max_targets_per_backward: int | None = None,
                     ) -> list[torch.Tensor]:
    """d scores[t].sum() / d tensor for every target t: one (T, *tensor.shape) tensor per input.

    ``batched``: True backpropagates the T targets in vmapped backwards (``is_grads_batched``),
    False loops over targets, "auto" tries the batched path and falls back to the loop when some op
    in the graph has no batching rule. Both give the same numbers.

    ``max_targets_per_backward``: a batched backward carries one copy of every intermediate
    gradient per target, so its memory grows with T; the targets go in chunks of at most this
    many, each one batched backward over the same forward graph (chunked equals unchunked).
    None (auto): on CUDA the first chunk has ``CUDA_FIRST_CHUNK`` (8) targets, its peak memory
    increase (``torch.cuda.max_memory_allocated``) per target sizes the rest to
    ``CUDA_MEMORY_SHARE`` (80%) of the memory then available (``torch.cuda.mem_get_info`` plus
    torch's unused cache); on other devices ``CPU_TARGETS_PER_BACKWARD`` (64). A chunk that raises
    ``torch.OutOfMemoryError`` is retried at half the size (CUDA cache emptied first), down to one
    target, where the error is raised; one warning names the size it went on with.
    """
    if batched not in BATCHED_MODES:
        raise ValueError(f"batched must be one of {BATCHED_MODES}, got {batched!r}")
    limit = check_max_targets(max_targets_per_backward)
    if not scores.requires_grad:
        raise RuntimeError(
            "the target scores do not depend on the captured layer (no gradient path): "
            "is the layer upstream of the output the targets read?"
        )
    if batched is False or scores.shape[0] == 1:
        return _loop_grads(scores, tensors)
    return _chunked_grads(scores, tensors, batched, limit)
