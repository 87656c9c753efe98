"""CAM (Zhou et al.) for a GAP + linear head: the map is the classifier weights applied per location."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..engine.capture import ActivationCapture, OutputIndex
from ..engine.explanation import Explanation
from ..engine.inputs import Inputs, call_model, input_size_of
from ..engine.layers import resolve_layer
from ..engine.layouts import Layout
from ..engine.state import preserved_state
from ..targets import ClassScore


def cam(model: nn.Module, inputs: Inputs, layer: nn.Module | str, classifier: nn.Linear | torch.Tensor,
        classes: Sequence[int | Sequence[int]], *, layout: str = "auto", prefix_tokens: int | None = None,
        grid: tuple[int, int] | None = None, output_index: OutputIndex = None, eval_mode: bool = True,
        input_size: tuple[int, int] | None = None, image_key: str | None = None) -> Explanation:
    """Class activation maps for ``classes`` (T entries, each an int or one index per sample).

    ``classifier`` is the linear layer after global average pooling (or its (K, C) weight). The
    scores are the model output's logits for each class.
    """
    weight = classifier.weight if isinstance(classifier, nn.Module) else classifier
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("classifier must be an nn.Linear or a (num_classes, channels) weight tensor")
    if isinstance(classes, int):
        raise TypeError("classes must be a sequence (T entries), e.g. [3] or [3, 5]")
    name, module = resolve_layer(model, layer)
    with preserved_state(model, eval_mode), torch.no_grad(), ActivationCapture([(name, module)], output_index) as capture:
        output = call_model(model, inputs)
        activation = capture.activation(name).detach()
    acts = Layout(layout, prefix_tokens, grid).resolve(activation).to_bchw(activation).float()
    batch, channels = acts.shape[:2]
    if weight.shape[1] != channels:
        raise ValueError(f"classifier has {weight.shape[1]} input features but layer {name!r} has {channels} channels")
    class_weights = []
    for entry in classes:
        index = torch.as_tensor([entry] * batch if isinstance(entry, int) else list(entry), dtype=torch.long)
        if index.shape != (batch,):
            raise ValueError(f"classes entry {entry!r}: expected an int or {batch} per-sample indices")
        class_weights.append(weight.detach().float()[index.to(weight.device)])  # (B, C)
    w = torch.stack(class_weights)[..., None, None].to(acts.device)  # (T, B, C, 1, 1)
    signed = (w * acts.unsqueeze(0)).sum(dim=2)
    scores = torch.stack([ClassScore(entry)(output).detach() for entry in classes])
    size = tuple(input_size) if input_size is not None else input_size_of(inputs, image_key)
    return Explanation(layer_maps=signed.clamp(min=0), signed_layer_maps=signed, activations=acts,
                       gradients=None, scores=scores, input_size=size, method="cam", layer_name=name)
