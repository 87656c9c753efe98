"""``explain``: one forward pass, all targets backpropagated together, maps from any CAM method."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .capture import ActivationCapture, OutputIndex
from .device import DtypeSpec, autocast, module_device, resolve_dtype
from .explanation import Explanation
from .gradients import Target, check_max_targets, check_targets, target_gradients, target_scores
from .inputs import Inputs, call_model, input_size_of
from .layers import resolve_layer
from .layouts import FunctionLayout, Layout
from .attention import explain_attention
from .registry import CAMMethod, MethodSpec, ReadoutMethod, get_method, is_attention_method, is_several, method_names
from .state import preserved_state

LayerSpec = nn.Module | str


def _zero_gradient_warning(layer_name: str) -> None:
    warnings.warn(
        f"every gradient at layer {layer_name!r} is zero, so its maps are empty. The classic cause "
        "is a ViT's last block when the head reads only the CLS token: the image tokens there do "
        "not reach the output. Explain an earlier layer (e.g. the last block's first layer norm or "
        "the block before it).",
        stacklevel=3,
    )


def forward_and_gradients(model: nn.Module, inputs: Inputs, targets: Sequence[Target],
                          layers: Sequence[tuple[str, nn.Module]], *, output_index: OutputIndex = None,
                          batched: bool | str = "auto", eval_mode: bool = True, dtype: DtypeSpec = None,
                          max_targets_per_backward: int | None = None, batch_size: Any = None,
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """One forward pass with ``layers`` captured; returns (activations, gradients (T, ...), scores (T, B)).
    ``dtype`` ("bfloat16", "float16"): the forward runs under autocast in that precision.
    ``batch_size``: ``(activation) -> B`` for a layer output whose first dimension is not the batch."""
    with preserved_state(model, eval_mode), torch.inference_mode(False), torch.enable_grad(), \
            ActivationCapture(layers, output_index) as capture:
        with autocast(module_device(model), resolve_dtype(dtype)):
            output = call_model(model, inputs)
        activations = [capture.activation(name) for name, _ in layers]
        batch = int(activations[0].shape[0] if batch_size is None else batch_size(activations[0]))
        scores = target_scores(targets, output, batch)
        gradients = target_gradients(scores, activations, batched, max_targets_per_backward)
    return [a.detach() for a in activations], [g.detach() for g in gradients], scores.detach()


def explain(model: nn.Module, inputs: Inputs, targets: Sequence[Target],
            layer: LayerSpec | Sequence[LayerSpec], method: MethodSpec = "gradcam", *,
            counterfactual: bool = False, layout: Any = "auto", prefix_tokens: int | None = None,
            grid: tuple[int, int] | None = None, output_index: OutputIndex = None,
            batched: bool | str = "auto", eval_mode: bool = True,
            input_size: tuple[int, int] | None = None, image_key: str | None = None,
            attention: Any = None, readout: torch.Tensor | None = None, dtype: DtypeSpec = None,
            max_targets_per_backward: int | None = None,
            ) -> Explanation | dict[str, Explanation] | list:
    """Explain T targets at ``layer`` from a single forward pass.

    model: left as it was (mode, requires_grad, .grad, hooks), also when an exception escapes;
        run in eval mode unless ``eval_mode=False``.
    inputs: a Tensor (``model(x)``) or a Mapping of keyword inputs (``model(**inputs)``).
    targets: T callables, each model output -> Tensor (B,).
    layer: an nn.Module inside ``model`` or its dotted name; a list of them gives a list of
        Explanations from the same forward and backward pass.
    method: a name of ``available_methods(pixel=True)``; several at once as "gradcam,layercam", a
        list of names or "all" (every CAM method) give a dict {name: Explanation}, every CAM map
        from the same forward and backward pass (the methods differ only in how they weigh the
        same activations and gradients, which the Explanations share). A pixel-space method
        (Guided Grad-CAM) adds its own pass over the input and its map as ``pixel_maps``.
    counterfactual: negate the gradients (the Grad-CAM paper's counterfactual explanation: what
        speaks against the target).
    layout / prefix_tokens / grid: how to read the layer output ("auto": 4-D is (B, C, h, w),
        3-D is tokens (B, N, C) with prefix tokens dropped and a square grid inferred;
        "bhwc" for channels-last; or a function ``(tensor, lead) -> (..., C, h, w)``).
    output_index: which element of a tuple / ModelOutput layer output to use (default: the first,
        or ``last_hidden_state``).
    batched: "auto" (batched backward, loop fallback), True or False.
    max_targets_per_backward: at most this many targets per batched backward (memory grows with
        the targets in one backward); None: auto (64 off CUDA, sized from free memory on CUDA).
        A chunk that runs out of memory is retried at half the size. See ``target_gradients``.
    input_size: (H, W) for ``maps`` when the inputs hold no (B, C, H, W) image.
    attention / readout: for the attention methods ("attention-gradcam", "relevance"): the model's
        ``AttentionGraph`` and the (T, B, text rows) readout weights (the tasks build both); their
        maps come from their own forward and batched backward over the attention probabilities,
        ``layer`` is not used for them.
    dtype: None / "float32", or "bfloat16" / "float16": the forward runs under autocast in that
        precision (the model's weights are not touched); maps are computed in float32.
    Inputs are moved to the model's device; the maps stay on it.
    """
    check_max_targets(max_targets_per_backward)  # before any forward
    names = method_names(method)
    attention_names = [n for n in names if is_attention_method(n)]
    if attention_names:
        if attention is None or readout is None:
            raise ValueError(f"{', '.join(attention_names)} need the model's attention: pass attention="
                             "AttentionGraph(...) and readout=(T, B, rows) weights, or use a task's explain "
                             "(captioning / vqa), which builds them")
        size = tuple(input_size) if input_size is not None else input_size_of(inputs, image_key)
        found = explain_attention(model, inputs, targets, attention, readout, attention_names, batched=batched,
                                  eval_mode=eval_mode, counterfactual=counterfactual, input_size=size, dtype=dtype,
                                  max_targets_per_backward=max_targets_per_backward)
        rest = [n for n in names if n not in found]
        if rest:  # the CAM methods of the same call: their own pass at ``layer`` (a list gives a dict)
            found.update(explain(model, inputs, targets, layer, rest, counterfactual=counterfactual, layout=layout,
                                 prefix_tokens=prefix_tokens, grid=grid, output_index=output_index,
                                 batched=batched, eval_mode=eval_mode, input_size=size, image_key=image_key,
                                 dtype=dtype, max_targets_per_backward=max_targets_per_backward))
        ordered = {n: found[n] for n in names}
        return ordered if is_several(method) else ordered[names[0]]
    requested = [get_method(name) for name in names]
    readout = [m.name for m in requested if isinstance(m, ReadoutMethod)]
    if readout:  # read from the forward by a task adapter (e.g. TAM through Captioner.explain for GIT)
        raise ValueError(f"method {readout[0]!r} is computed by a task adapter that supports it "
                         "(captioning.load(...).explain), not by mg.explain")
    # a pixel-space method refines its base CAM method's maps: that one is computed in the pass too
    cam_methods = [get_method(name) for name in dict.fromkeys(
        m.name if isinstance(m, CAMMethod) else m.base for m in requested)]
    pixel_methods = [m for m in requested if not isinstance(m, CAMMethod)]
    targets = check_targets(targets)
    layer_list = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layer_list:
        raise ValueError("layer is an empty list; name at least one layer")
    layers = [resolve_layer(model, spec) for spec in layer_list]
    base_layout = layout if isinstance(layout, (Layout, FunctionLayout)) else \
        FunctionLayout(layout) if callable(layout) else Layout(layout, prefix_tokens, grid)
    size = tuple(input_size) if input_size is not None else input_size_of(inputs, image_key)

    activations, gradients, scores = forward_and_gradients(
        model, inputs, targets, layers, output_index=output_index, batched=batched, eval_mode=eval_mode, dtype=dtype,
        max_targets_per_backward=max_targets_per_backward, batch_size=getattr(base_layout, "batch_size", None),
    )
    # each pixel-space method's pass over the input, once for all layers
    passes = {m.name: m.input_pass(model, inputs, targets, image_key=image_key, batched=batched, eval_mode=eval_mode,
                                   max_targets_per_backward=max_targets_per_backward) for m in pixel_methods}
    results = []
    for (name, _), activation, gradient in zip(layers, activations, gradients):
        resolved = base_layout.resolve(activation)
        acts = resolved.to_bchw(activation, lead=1).float()
        grads = resolved.to_bchw(gradient, lead=2).float()
        if not torch.any(grads != 0):
            _zero_gradient_warning(name)
        if counterfactual:
            grads = -grads
        by_method = {}
        for cam_method in cam_methods:
            weights = cam_method.weights(acts, grads)
            signed = cam_method.combine(weights, acts)
            by_method[cam_method.name] = Explanation(
                layer_maps=signed.clamp(min=0), signed_layer_maps=signed, activations=acts,
                gradients=grads, scores=scores, input_size=size, method=cam_method.name,
                layer_name=name, counterfactual=counterfactual, channel_weights=cam_method.channel_weights(weights),
            )
        for pixel_method in pixel_methods:
            pixels = passes[pixel_method.name]
            base = by_method[pixel_method.base]
            fused = pixel_method.fuse(pixels, base.upsample(pixels.shape[-2:]).to(pixels.device))
            by_method[pixel_method.name] = replace(base, method=pixel_method.name,
                                                   pixel_maps=pixel_method.pixel_map(fused))
        results.append({n: by_method[n] for n in names} if is_several(method) else by_method[names[0]])
    return results if isinstance(layer, (list, tuple)) else results[0]


def counterfactual(model: nn.Module, inputs: Inputs, targets: Sequence[Target], layer: LayerSpec,
                   method: MethodSpec = "gradcam", **kwargs: Any) -> Explanation | dict[str, Explanation]:
    """Counterfactual maps (negated gradients): regions whose removal would raise the targets."""
    return explain(model, inputs, targets, layer, method, counterfactual=True, **kwargs)
