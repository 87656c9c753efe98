"""Model inputs: a tensor (``model(x)``) or a mapping of keyword inputs (``model(**inputs)``)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

from .device import module_device, to_device

Inputs = Union[torch.Tensor, Mapping[str, Any]]


def check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, (torch.Tensor, Mapping)):
        raise TypeError(
            f"inputs must be a Tensor (called as model(x)) or a Mapping of keyword inputs "
            f"(called as model(**inputs)), got {type(inputs).__name__}"
        )


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)`` or ``model(**inputs)`` with the input tensors on the model's device."""
    check_inputs(inputs)
    inputs = to_device(inputs, module_device(model))
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(**inputs)


def image_key_of(inputs: Inputs, image_key: str | None = None) -> str | None:
    """The key of the image tensor in a mapping (None for a plain tensor)."""
    check_inputs(inputs)
    if isinstance(inputs, torch.Tensor):
        return None
    if image_key is not None:
        if image_key not in inputs:
            raise KeyError(f"image_key {image_key!r} is not among the inputs' keys {sorted(inputs)}")
        return image_key
    if "pixel_values" in inputs:
        return "pixel_values"
    images = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point()]
    if len(images) == 1:
        return images[0]
    raise ValueError(
        "cannot tell which input is the image: pass image_key= (found 4-D float inputs: "
        f"{images or 'none'})"
    )


def image_of(inputs: Inputs, image_key: str | None = None) -> torch.Tensor:
    key = image_key_of(inputs, image_key)
    image = inputs if key is None else inputs[key]
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"the image input must be a (B, C, H, W) tensor, got {shape}")
    return image


def input_size_of(inputs: Inputs, image_key: str | None = None) -> tuple[int, int] | None:
    """(H, W) of the image input, or None when there is no unambiguous image."""
    try:
        image = image_of(inputs, image_key)
    except (ValueError, KeyError):
        return None
    return int(image.shape[-2]), int(image.shape[-1])


def batch_size_of(inputs: Inputs, image_key: str | None = None) -> int | None:
    try:
        return int(image_of(inputs, image_key).shape[0])
    except (ValueError, KeyError):
        for value in inputs.values() if isinstance(inputs, Mapping) else ():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    return None


def with_image(inputs: Inputs, image: torch.Tensor, image_key: str | None = None,
               repeat_rows: torch.Tensor | None = None) -> Inputs:
    """``inputs`` with the image replaced.

    ``repeat_rows`` (a LongTensor of sample indices) selects rows of every other batched
    tensor input so that they line up with a new image batch built from those samples.
    """
    key = image_key_of(inputs, image_key)
    if key is None:
        return image
    batch = inputs[key].shape[0]
    out = dict(inputs)
    out[key] = image
    if repeat_rows is not None:
        for name, value in inputs.items():
            if name != key and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                out[name] = value.index_select(0, repeat_rows.to(value.device))
    return out


def slice_batch(output: Any, start: int, stop: int, batch: int) -> Any:
    """Rows ``start:stop`` of every tensor in a model output whose first dimension is ``batch``."""
    if isinstance(output, torch.Tensor):
        return output[start:stop] if output.dim() > 0 and output.shape[0] == batch else output
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return type(output)(slice_batch(o, start, stop, batch) for o in output) if not hasattr(output, "_fields") \
            else type(output)(*(slice_batch(o, start, stop, batch) for o in output))
    if isinstance(output, list):
        return [slice_batch(o, start, stop, batch) for o in output]
    if isinstance(output, Mapping):
        sliced = {k: slice_batch(v, start, stop, batch) for k, v in output.items()}
        try:
            return type(output)(**sliced)  # ModelOutput and dataclass-like mappings
        except TypeError:
            return sliced
    return output
