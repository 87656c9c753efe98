"""Turning a captured layer output into a (B, C, h, w) feature map.

The same transform is applied to activations (B, ...) and to gradients (T, B, ...), so it is
written for any number of leading dimensions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAYOUTS = ("auto", "bchw", "tokens", "bhwc")


def infer_token_grid(num_tokens: int, prefix_tokens: int | None = None,
                     grid: tuple[int, int] | None = None, max_prefix: int = 16) -> tuple[int, tuple[int, int]]:
    """Return ``(prefix_tokens, (h, w))`` for a sequence of ``num_tokens`` tokens.

    With ``grid`` given, the prefix is what is left over. Otherwise the smallest prefix (CLS,
    registers, ...) that leaves a square number of tokens is taken.
    """
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        prefix = num_tokens - h * w if prefix_tokens is None else prefix_tokens
        if prefix < 0 or prefix + h * w != num_tokens:
            raise ValueError(
                f"grid {h}x{w} with {prefix_tokens} prefix tokens does not fit {num_tokens} tokens"
            )
        return prefix, (h, w)
    candidates = [prefix_tokens] if prefix_tokens is not None else range(0, min(max_prefix, num_tokens - 1) + 1)
    for prefix in candidates:
        side = math.isqrt(num_tokens - prefix)
        if side > 0 and side * side == num_tokens - prefix:
            return prefix, (side, side)
    raise ValueError(
        f"cannot infer a square token grid from {num_tokens} tokens"
        + (f" after {prefix_tokens} prefix tokens" if prefix_tokens is not None else "")
        + "; pass grid=(h, w) and/or prefix_tokens"
    )


@dataclass(frozen=True)
class Layout:
    """How to read a layer output: ``kind`` is one of LAYOUTS."""

    kind: str = "auto"
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.kind!r}")

    def resolve(self, activation: torch.Tensor) -> "Layout":
        """Fix ``auto`` (and the token grid) from one activation of shape (B, ...)."""
        kind = self.kind
        if kind == "auto":
            if activation.dim() == 4:
                kind = "bchw"
            elif activation.dim() == 3:
                kind = "tokens"
            else:
                raise ValueError(
                    f"layer output has shape {tuple(activation.shape)}; expected (B, C, h, w), "
                    "tokens (B, N, C) or channels-last (B, h, w, C) with layout='bhwc'"
                )
        expected_dim = 3 if kind == "tokens" else 4
        if activation.dim() != expected_dim:
            raise ValueError(
                f"layout {kind!r} expects a {expected_dim}-D layer output, got shape {tuple(activation.shape)}"
            )
        if kind == "tokens":
            prefix, grid = infer_token_grid(activation.shape[1], self.prefix_tokens, self.grid)
            return Layout("tokens", prefix, grid)
        return Layout(kind)

    def to_bchw(self, tensor: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """Reshape a resolved-layout tensor with ``lead`` leading dims (B, or T and B) to (..., C, h, w)."""
        if self.kind == "bchw":
            return tensor
        if self.kind == "bhwc":
            return tensor.movedim(-1, lead)
        if self.kind == "tokens":
            h, w = self.grid
            spatial = tensor[..., self.prefix_tokens:, :]
            spatial = spatial.reshape(*spatial.shape[:lead], h, w, spatial.shape[-1])
            return spatial.movedim(-1, lead)
        raise RuntimeError("resolve() the layout before using it")


@dataclass(frozen=True)
class FunctionLayout:
    """A layout given as a function ``(tensor, lead) -> (..., C, h, w)``, for token orders the
    built-in layouts cannot express (ViLT's image tokens after the text, placed by patch index).

    ``batch_size``: optional ``(activation) -> number of samples``, for a layer output whose first
    dimension is not the batch (the tokens of several images packed into one sequence, as in
    Qwen2-VL's vision tower); None: the first dimension."""

    function: object
    batch_size: object = None

    def resolve(self, activation: torch.Tensor) -> "FunctionLayout":
        return self

    def to_bchw(self, tensor: torch.Tensor, lead: int = 1) -> torch.Tensor:
        return self.function(tensor, lead)
