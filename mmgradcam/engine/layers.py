"""Finding the layer a user names."""
from __future__ import annotations

import difflib

from torch import nn


def resolve_layer(model: nn.Module, layer: nn.Module | str) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` for a module object or dotted name inside ``model``."""
    if isinstance(layer, str):
        names = dict(model.named_modules())
        if layer in names:
            return layer, names[layer]
        close = difflib.get_close_matches(layer, [n for n in names if n], n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"layer {layer!r} is not a submodule of {type(model).__name__}.{hint}")
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError(
            f"layer {type(layer).__name__} is not a submodule of {type(model).__name__}; "
            "pass a module inside the model or its dotted name"
        )
    raise TypeError(f"layer must be an nn.Module or a dotted name (str), got {type(layer).__name__}")


def find_modules(model: nn.Module, type_name: str | type) -> list[tuple[str, nn.Module]]:
    """All ``(name, module)`` whose class is ``type_name`` (a class, or its name).

    Finding layers by type rather than by attribute chains keeps adapters working across
    library versions that move modules around (transformers 4.x vs 5.x).
    """
    if isinstance(type_name, str):
        return [(n, m) for n, m in model.named_modules() if type(m).__name__ == type_name]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, type_name)]
