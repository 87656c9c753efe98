"""A torch function mode that records every tensor the toolkit creates without naming a device.

Factory calls (torch.zeros, torch.tensor, torch.arange, ...) made from mmgradcam's own files
(mmgradcam/, tasks/) must say where the tensor goes (``device=``) or derive it from a tensor
(``*_like``, ``new_*``); one that relies on torch's default device would land on the CPU while
the model is on a GPU. The mode only records: a test asserts the record is empty."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "mmgradcam") + "/", str(ROOT / "tasks") + "/")


class DefaultDeviceRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and "torch/" in frame.f_code.co_filename.replace("\\", "/") \
                    and not frame.f_code.co_filename.startswith(OURS):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(OURS):
                where = f"{Path(frame.f_code.co_filename).relative_to(ROOT)}:{frame.f_lineno} {func.__name__}"
                if where not in self.found:
                    self.found.append(where)
        return func(*args, **kwargs)
