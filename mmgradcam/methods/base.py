"""CAM methods: each one only says how it weighs the layer's activations.

A method maps activations A (B, C, h, w) and gradients G (T, B, C, h, w) to weights that
broadcast against G; the map is then sum_c weights * A (signed), and ReLU of that.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_REGISTRY: dict[str, "CAMMethod"] = {}


class CAMMethod:
    name: str = ""

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def signed_map(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """(T, B, h, w) map before the final ReLU."""
        return (self.weights(activations, gradients) * activations.unsqueeze(0)).sum(dim=2)


def register(cls: type[CAMMethod]) -> type[CAMMethod]:
    _REGISTRY[cls.name] = cls()
    return cls


def _canonical(name: str) -> str:
    return name.lower().replace("++", "pp").replace("-", "").replace("_", "").replace(" ", "")


def get_method(name: str) -> CAMMethod:
    """The method called ``name`` ("gradcam", "Grad-CAM++", "gradcam_pp" ... all work)."""
    by_key = {_canonical(n): m for n, m in _REGISTRY.items()}
    if not isinstance(name, str) or _canonical(name) not in by_key:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return by_key[_canonical(name)]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


MethodSpec = str | Sequence[str]


def is_several(method: MethodSpec) -> bool:
    """True when ``method`` asks for several maps at once (a list, "a,b" or "all")."""
    return not isinstance(method, str) or "," in method or method.strip().lower() == "all"


def method_names(method: MethodSpec, known: Sequence[str] | None = None) -> list[str]:
    """Canonical names, in order and without repeats, of "gradcam", "gradcam,layercam", a list of
    names, or "all" (every registered CAM method; ``known`` replaces the registry as the set of
    valid names, for callers that also accept methods outside it)."""
    valid = list(known) if known is not None else available_methods()
    by_key = {_canonical(n): n for n in valid}
    if isinstance(method, str):
        if method.strip().lower() == "all":
            return list(valid)
        parts = [part.strip() for part in method.split(",")]
    elif isinstance(method, Sequence) and all(isinstance(part, str) for part in method):
        parts = [part.strip() for part in method]
    else:
        raise TypeError(f"method must be a name, a comma-separated string or a list of names, got {method!r}")
    parts = [part for part in parts if part]
    if not parts:
        raise ValueError(f"method {method!r} names no method; available: {', '.join(valid)}")
    unknown = [part for part in parts if _canonical(part) not in by_key]
    if unknown:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; available: {', '.join(valid)}")
    return list(dict.fromkeys(by_key[_canonical(part)] for part in parts))
