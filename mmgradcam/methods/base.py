"""CAM methods: each one only says how it weighs the layer's activations.

A method maps activations A (B, C, h, w) and gradients G (T, B, C, h, w) to weights that
broadcast against G; the map is then sum_c weights * A (signed), and ReLU of that.
"""
from __future__ import annotations

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
