"""Leaving the caller's model exactly as it was."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _hook_keys(module: nn.Module) -> dict[str, tuple]:
    return {name: tuple(getattr(module, name, {}).keys()) for name in _HOOK_DICTS}


def snapshot(model: nn.Module) -> dict:
    """Everything explain could touch: per-module mode and hooks, per-parameter flag and grad."""
    return {
        "training": [(m, m.training) for m in model.modules()],
        "hooks": [(m, _hook_keys(m)) for m in model.modules()],
        "params": [(p, p.requires_grad, p.grad) for p in model.parameters()],
    }


def restore(state: dict) -> None:
    for module, training in state["training"]:
        module.training = training
    for param, requires_grad, grad in state["params"]:
        if param.requires_grad != requires_grad:
            param.requires_grad_(requires_grad)
        if param.grad is not grad:
            param.grad = grad
    for module, keys in state["hooks"]:
        # A safety net: our own hooks are removed by their handles; anything still
        # registered that was not there before is ours and goes too.
        for name, before in keys.items():
            hooks = getattr(module, name, None)
            if hooks is None:
                continue
            for key in [k for k in hooks.keys() if k not in before]:
                del hooks[key]


@contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run a block with ``model`` in eval mode (optionally) and restore mode, flags, grads and hooks."""
    state = snapshot(model)
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        restore(state)
