"""The method registry: every method says what it knows, the engine looks it up by name.

It lives in the engine floor so that ``explain`` finds methods without importing methods/ (every
method imports the engine). Two kinds:

- ``CAMMethod``: weighs the layer's activations A (B, C, h, w) with gradients G (T, B, C, h, w);
  the map is sum_c weights * A (signed), then ReLU. All CAM methods share one forward and one
  backward; "all" means every registered CAM method.
- ``PixelMethod``: refines a CAM method's map with its own pass over the model input (Guided
  Grad-CAM) and owns its fusion rule; its map lives at the input's resolution.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

_REGISTRY: dict[str, "CAMMethod | PixelMethod | AttentionMethod"] = {}


class CAMMethod:
    name: str = ""

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def signed_map(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """(T, B, h, w) map before the final ReLU."""
        return self.combine(self.weights(activations, gradients), activations)

    @staticmethod
    def combine(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return (weights * activations.unsqueeze(0)).sum(dim=2)

    @staticmethod
    def channel_weights(weights: torch.Tensor) -> torch.Tensor | None:
        """(T, B, C) when the method weighs each channel with one number (Grad-CAM's mean
        gradient, Grad-CAM++, XGrad-CAM); None when its weights vary per location (HiResCAM,
        LayerCAM): those have no per-channel weights to report."""
        if weights.dim() != 5 or weights.shape[-2:] != (1, 1):
            return None
        return weights.reshape(*weights.shape[:3])


class PixelMethod:
    """A method built on a CAM method's (``base``) maps and a pass over the model input."""

    name: str = ""
    base: str = "gradcam"

    def input_pass(self, model: Any, inputs: Any, targets: Sequence[Any], *, image_key: str | None,
                   batched: bool | str, eval_mode: bool, max_targets_per_backward: int | None = None,
                   ) -> torch.Tensor:
        """(T, B, C, H, W): the method's own attribution of the image input."""
        raise NotImplementedError

    def fuse(self, pixels: torch.Tensor, cam_maps: torch.Tensor) -> torch.Tensor:
        """``pixels`` (T, B, C, H, W) combined with the CAM maps (T, B, H, W) at the same size."""
        raise NotImplementedError

    def pixel_map(self, fused: torch.Tensor) -> torch.Tensor:
        """(T, B, H, W): one value per pixel of ``fuse``'s result, for heatmaps and scoring."""
        raise NotImplementedError


class AttentionMethod:
    """A transformer-aware method: a map from the attention probabilities of every captured
    attention layer and their gradients (``engine.attention.AttentionPass``), not from a layer's
    activations. Applies only to models whose task describes their attention."""

    name: str = ""

    def layer_map(self, computed: Any) -> torch.Tensor:
        """(T, B, h, w) signed map over the image-token grid."""
        raise NotImplementedError

    def layer_name(self, computed: Any) -> str:
        return "attention"


def register(cls: type) -> type:
    _REGISTRY[cls.name] = cls()
    return cls


def _canonical(name: str) -> str:
    return name.lower().replace("++", "pp").replace("-", "").replace("_", "").replace(" ", "")


def get_method(name: str) -> CAMMethod | PixelMethod | AttentionMethod:
    """The method called ``name`` ("gradcam", "Grad-CAM++", "gradcam_pp" ... all work)."""
    by_key = {_canonical(n): m for n, m in _REGISTRY.items()}
    if not isinstance(name, str) or _canonical(name) not in by_key:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods(pixel=True))}")
    return by_key[_canonical(name)]


def available_methods(pixel: bool = False, attention: bool | None = None) -> list[str]:
    """The registered CAM methods (what "all" stands for in ``mg.explain``); ``pixel=True`` adds
    the pixel-space methods built on them (Guided Grad-CAM), the readout methods (TAM) and the attention methods
    (attention-gradcam, relevance), which need a model whose task describes its attention;
    ``attention`` (default: same as ``pixel``) includes or leaves out the attention methods."""
    attention = pixel if attention is None else attention
    return sorted(n for n, m in _REGISTRY.items()
                  if isinstance(m, CAMMethod) or (pixel and isinstance(m, (PixelMethod, ReadoutMethod)))
                  or (attention and isinstance(m, AttentionMethod)))


def is_attention_method(name: str) -> bool:
    return isinstance(get_method(name), AttentionMethod)


def is_pixel_method(name: str) -> bool:
    return isinstance(get_method(name), PixelMethod)


MethodSpec = str | Sequence[str]


def is_several(method: MethodSpec) -> bool:
    """True when ``method`` asks for several maps at once (a list, "a,b" or "all")."""
    return not isinstance(method, str) or "," in method or method.strip().lower() == "all"


def method_names(method: MethodSpec, known: Sequence[str] | None = None) -> list[str]:
    """Canonical names, in order and without repeats, of "gradcam", "gradcam,layercam", a list of
    names, or "all" (every registered CAM method; ``known`` replaces the registry as the set of
    valid names and as what "all" stands for, e.g. the methods one result holds)."""
    valid = list(known) if known is not None else available_methods(pixel=True)
    every = list(known) if known is not None else available_methods()
    by_key = {_canonical(n): n for n in valid}
    if isinstance(method, str):
        if method.strip().lower() == "all":
            return every
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


class ReadoutMethod:
    """A method read from the model's own forward, without gradients, by a task adapter that can
    (TAM: the LM head read at image tokens that sit in the text sequence). The engine's
    ``explain`` does not compute it; the task calls ``maps`` on what its adapter read."""

    name: str = ""

    def maps(self, raw: torch.Tensor) -> torch.Tensor:
        """(n_words, h, w) maps of one caption's words, in caption order, from the adapter's raw
        readouts (n_words, h, w)."""
        raise NotImplementedError


def is_readout_method(name: str) -> bool:
    return isinstance(get_method(name), ReadoutMethod)
