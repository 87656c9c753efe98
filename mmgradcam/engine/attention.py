"""Attention-based explanations: capture the attention probabilities of a forward pass, backpropagate
every target to them in one batched backward, and hand both to an ``AttentionMethod``.

The engine knows nothing about captions or models: a task describes the model's attention as an
``AttentionGraph`` (which modules, of which kind, in what order; where the image tokens sit and on
which grid), and gives per target the text rows to read the map from (``readout``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .device import DtypeSpec, autocast, module_device, resolve_dtype
from .explanation import Explanation
from .gradients import Target, check_max_targets, check_targets, target_gradients, target_scores
from .inputs import Inputs, call_model, input_size_of
from .registry import AttentionMethod, get_method
from .state import preserved_state

# the kinds of attention layer a graph may hold
KINDS = ("self", "cross", "joint")


def mha_probabilities(module: nn.Module, args: Any, kwargs: Any, output: Any) -> torch.Tensor:
    """(B, heads, Lq, Lk) probabilities of a torch ``nn.MultiheadAttention`` run with
    ``need_weights=True, average_attn_weights=False`` (``mha_pre_hook``).

    torch returns a reshaped view of the probabilities it multiplied the values with; the view
    itself is not on the gradient path, its base is, so the gradient is taken at the base."""
    weights = output[1]
    if weights is None or weights.dim() != 4:
        raise RuntimeError(f"{type(module).__name__} returned no per-head attention weights")
    base = weights._base
    if base is None or base.numel() != weights.numel() or not base.requires_grad:
        raise RuntimeError("could not reach the attention probabilities on the gradient path "
                           f"of {type(module).__name__} (is the model in training mode with dropout?)")
    return base


def mha_view(base: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return base.reshape(like.shape)


def mha_pre_hook(module: nn.Module, args: Any, kwargs: dict) -> tuple[Any, dict]:
    """Ask torch's MultiheadAttention for its per-head probabilities (TransformerDecoderLayer
    calls it with need_weights=False) without editing torch's code."""
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def tuple_probabilities(module: nn.Module, args: Any, kwargs: Any, output: Any) -> torch.Tensor:
    """(B, heads, Lq, Lk): the second element of an attention module's output (transformers' eager
    attention returns ``(context, probabilities)``)."""
    probs = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
        raise RuntimeError(f"{type(module).__name__} returned no attention probabilities "
                           "(is the eager attention implementation selected?)")
    return probs


@dataclass
class AttentionLayer:
    """One attention module: ``kind`` "self" (text to text), "cross" (text rows to image columns)
    or "joint" (one sequence of image and text tokens); ``read(module, args, kwargs, output)``
    returns its (B, heads, Lq, Lk) probabilities on the gradient path; ``pre_hook`` (optional)
    changes the call so the module computes them."""

    module: nn.Module
    kind: str
    read: Callable[..., torch.Tensor] = tuple_probabilities
    pre_hook: Callable[..., Any] | None = None
    # 0: cross-attention keys are the image tokens; s > 0: the text rows of stage s - 1 (BLIP VQA's
    # answer decoder reads the question encoder, which reads the image)
    stage: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"attention kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class AttentionGraph:
    """How a model's attention reaches the image.

    layers: in the order the forward runs them.
    grid: (h, w) of the image tokens.
    image_columns: the image tokens' columns: among a cross-attention's keys, or among a joint
        sequence's positions (prefix tokens such as CLS left out).
    text_offset: where text row 0 sits in a joint sequence (GIT puts the image tokens first).
    context: entered around the forward (e.g. transformers' eager attention, restored after).
    placement: optional ``(T, B, n image tokens) -> (T, B, h, w)`` called after the forward, for
        models whose image tokens are not the grid in order (ViLT samples patches); ``grid`` then
        only documents the shape.
    """

    layers: list[AttentionLayer]
    grid: tuple[int, int]
    image_columns: slice
    text_offset: int = 0
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    placement: Callable[[torch.Tensor], torch.Tensor] | None = None
    # staged graphs: weights of stage 0's text rows, where attention-gradcam reads its map
    stage_rows: torch.Tensor | None = None

    @property
    def joint(self) -> bool:
        return any(layer.kind == "joint" for layer in self.layers)


@dataclass
class AttentionPass:
    """What one forward and one batched backward give every attention method."""

    graph: AttentionGraph
    kinds: list[str]
    probabilities: list[torch.Tensor]  # per layer (B, heads, Lq, Lk), detached
    gradients: list[torch.Tensor]      # per layer (T, B, heads, Lq, Lk)
    readout: torch.Tensor              # (T, B, Lt) weights over text rows
    scores: torch.Tensor               # (T, B)

    def to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        """(T, B, n) rows over the layer's keys / positions -> (T, B, h, w) over the image grid."""
        image = rows[..., self.graph.image_columns]
        if self.graph.placement is not None:
            return self.graph.placement(image)
        h, w = self.graph.grid
        if image.shape[-1] != h * w:
            raise ValueError(f"{image.shape[-1]} image tokens do not fill the {h}x{w} grid")
        return image.reshape(*image.shape[:-1], h, w)

    def read_rows(self, matrix: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(T, B, Lq, n) -> (T, B, n): each target's readout-weighted rows (text rows start at ``offset``)."""
        rows = matrix[:, :, offset:offset + self.readout.shape[-1]]
        return torch.einsum("tbr,tbrn->tbn", self.readout.to(rows), rows)


@contextlib.contextmanager
def captured_attention(layers: Sequence[AttentionLayer]) -> Iterator[list[torch.Tensor]]:
    """Hooks on every layer's module that collect its probabilities in call order; removed on exit."""
    found: list[tuple[int, torch.Tensor]] = []
    handles = []
    try:
        for index, layer in enumerate(layers):
            if layer.pre_hook is not None:
                handles.append(layer.module.register_forward_pre_hook(layer.pre_hook, with_kwargs=True))

            def record(module: nn.Module, args: Any, kwargs: Any, output: Any, index: int = index,
                       layer: AttentionLayer = layer) -> None:
                found.append((index, layer.read(module, args, kwargs, output)))
            handles.append(layer.module.register_forward_hook(record, with_kwargs=True))
        collected: list[torch.Tensor] = []
        yield collected
        collected[:] = [probs for _, probs in sorted(found, key=lambda item: item[0])]
    finally:
        for handle in handles:
            handle.remove()


def attention_pass(model: nn.Module, inputs: Inputs, targets: Sequence[Target], graph: AttentionGraph,
                   readout: torch.Tensor, *, batched: bool | str = "auto", eval_mode: bool = True,
                   counterfactual: bool = False, dtype: DtypeSpec = None,
                   max_targets_per_backward: int | None = None) -> AttentionPass:
    """One forward with the attention captured and one batched backward of all targets to it."""
    targets = check_targets(targets)
    with preserved_state(model, eval_mode), graph.context(), torch.inference_mode(False), \
            torch.enable_grad():
        with captured_attention(graph.layers) as collected, autocast(module_device(model), resolve_dtype(dtype)):
            output = call_model(model, inputs)
        if len(collected) != len(graph.layers):
            raise RuntimeError(f"captured {len(collected)} of the {len(graph.layers)} attention layers")
        scores = target_scores(targets, output, int(_per_head(graph.layers[0], collected[0]).shape[0]))
        gradients = target_gradients(scores, collected, batched, max_targets_per_backward)
    probabilities = [_per_head(layer, p).detach().float() for layer, p in zip(graph.layers, collected)]
    # torch MHA's gradients are (T, B * heads, Lq, Lk) like its probabilities
    gradients = [g.detach().float().reshape(g.shape[0], *p.shape) for g, p in zip(gradients, probabilities)]
    if counterfactual:
        gradients = [-g for g in gradients]
    if readout.shape[:2] != scores.shape:
        raise ValueError(f"readout {tuple(readout.shape)} does not match {tuple(scores.shape)} targets x batch")
    return AttentionPass(graph, [layer.kind for layer in graph.layers], probabilities, gradients,
                         readout.float(), scores.detach())


def _per_head(layer: AttentionLayer, probs: torch.Tensor) -> torch.Tensor:
    """(B, heads, Lq, Lk) from a captured tensor (torch MHA keeps (B * heads, Lq, Lk))."""
    if probs.dim() == 4:
        return probs
    heads = getattr(layer.module, "num_heads", None)
    if heads is None:
        raise RuntimeError(f"cannot split {type(layer.module).__name__}'s probabilities into heads")
    return probs.reshape(probs.shape[0] // heads, heads, *probs.shape[1:])


def explain_attention(model: nn.Module, inputs: Inputs, targets: Sequence[Target], graph: AttentionGraph,
                      readout: torch.Tensor, methods: Sequence[str], *, batched: bool | str = "auto",
                      eval_mode: bool = True, counterfactual: bool = False,
                      input_size: tuple[int, int] | None = None, image_key: str | None = None,
                      dtype: DtypeSpec = None, max_targets_per_backward: int | None = None,
                      ) -> dict[str, Explanation]:
    """{method: Explanation} for attention methods, all from one forward and one batched backward.

    readout (T, B, Lt): for target t and sample b, the weights of the text rows its map is read
    from (a word: the positions whose logits score it). max_targets_per_backward: targets per
    batched backward (None: auto), as in ``target_gradients``."""
    check_max_targets(max_targets_per_backward)
    chosen = [get_method(name) for name in methods]
    for method in chosen:
        if not isinstance(method, AttentionMethod):
            raise ValueError(f"{method.name!r} is not an attention method")
    size = tuple(input_size) if input_size is not None else input_size_of(inputs, image_key)
    computed = attention_pass(model, inputs, targets, graph, readout, batched=batched, eval_mode=eval_mode,
                              counterfactual=counterfactual, dtype=dtype,
                              max_targets_per_backward=max_targets_per_backward)
    results = {}
    for method in chosen:
        signed = method.layer_map(computed)
        results[method.name] = Explanation(
            layer_maps=signed.clamp(min=0), signed_layer_maps=signed, activations=signed.new_empty(0),
            gradients=None, scores=computed.scores, input_size=size, method=method.name,
            layer_name=method.layer_name(computed), counterfactual=counterfactual)
    return results
