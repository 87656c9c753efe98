"""Devices and precision: which device a run uses, in which dtype the forward runs, and moving
inputs to the model's device.

Precision is autocast: the model's weights stay as they are (float32 for the shipped models), the
forward's matrix products and convolutions run in bfloat16 / float16, and the captured activations
and gradients are turned into float32 before any map is computed, so maps and scores are float32.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
DeviceSpec = str | torch.device | None
DtypeSpec = str | torch.dtype | None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: DeviceSpec = "auto") -> torch.device:
    """"auto" (or None): CUDA when available, else Apple MPS, else the CPU; otherwise the device
    named, which must be there (a clear error names it when it is not)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        resolved = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device name (expected 'auto', 'cpu', 'cuda', "
                         f"'cuda:N' or 'mps'): {error}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} is not available: this machine has no CUDA GPU that torch "
                             "can use (torch.cuda.is_available() is False); use device='cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps" and not _mps_available():
        raise ValueError(f"device {str(device)!r} is not available: torch has no Apple MPS backend here; "
                         "use device='cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: DtypeSpec = None) -> torch.dtype | None:
    """The forward's autocast dtype: None for float32 (no autocast), torch.bfloat16 or torch.float16."""
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    raise ValueError(f"dtype {dtype!r} is not supported: expected 'float32', 'bfloat16' or 'float16'")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The forward's precision context (nothing for float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter or buffer; the CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (alone, in a mapping, list or tuple) moved to ``device``; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return type(value)({k: to_device(v, device) for k, v in value.items()}) if isinstance(value, dict) \
            else {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
