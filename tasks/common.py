"""What captioning and VQA adapters share, and the registry that model families add themselves to.

This module names no family: a family file (tasks/default.py, tasks/blip.py, ...) imports the
shared bases and registers its loader (``register_loader``) and, for transformers models, the
adapter classes it handles (``register_adapter``). ``captioning.load`` and ``vqa.load`` only look
the registry up, so a new family is one new file and nothing shared changes.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import nn

from mmgradcam.engine import resolve_layer
from mmgradcam.engine.device import (DeviceSpec, DtypeSpec, autocast, module_device, resolve_device, resolve_dtype,
                                     to_device)

TASKS = ("captioning", "vqa")


class Adapter:
    """Layer handling and the input contract shared by every task adapter.

    ``model`` is what the engine runs; ``layer_root`` is the module layer names are relative to:
    the user's model, also when ``model`` wraps it (BLIP VQA's answer scorer)."""

    model: nn.Module
    family: str = "?"
    name: str = "?"
    default_layer: str = ""
    layer_reason: str = ""
    default_method: str = "gradcam"
    # engine options for the explained layer (layout, prefix_tokens, grid). Read-only here: an
    # adapter that needs options assigns its own mapping per instance, so no two adapters share one
    layer_options: Mapping[str, Any] = MappingProxyType({})
    # image -> a short note when the image lies outside what the model knows (None: silent);
    # the default family's loader sets its shapes-world check, other models know the world
    domain_check: Callable[[Image.Image], str | None] | None = None

    def domain_notice(self, image: Image.Image) -> str | None:
        return None if self.domain_check is None else self.domain_check(image)

    @property
    def layer_root(self) -> nn.Module:
        return self.model

    def resolve_layer(self, layer: nn.Module | str | None) -> nn.Module | str:
        layer = layer if layer is not None else self.default_layer
        if isinstance(layer, str) and self.layer_root is not self.model:
            return resolve_layer(self.layer_root, layer)[1]
        return layer

    def prepare(self, image: Any, text: str) -> tuple[dict[str, torch.Tensor], Any]:
        """The model's keyword inputs for one image and its text (a caption or a question), and
        the geometry that maps the model's pixels back onto the original image.

        One contract for both tasks, so code that perturbs the pixels (adversarial attacks,
        layer dissection) swaps ``inputs["pixel_values"]`` and calls ``explain_prepared``."""
        raise NotImplementedError

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel (mean, std) mapping [0, 1] pixels to the model's input values."""
        raise NotImplementedError

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        """The model's ``AttentionGraph`` (mmgradcam.engine.attention) for the attention methods
        (attention-gradcam, relevance); None when the model has no attention to the image."""
        return None

    def method_choice(self, method: Any) -> list[str]:
        """Canonical method names for a task call: "all" is every method that applies to this model
        (the CAM methods, and the attention methods when it reads the image through attention); an
        attention method on a model without attention is refused, naming the model."""
        from mmgradcam.engine.registry import available_methods, is_attention_method, method_names

        attention = available_methods(attention=True)
        attention = [n for n in attention if is_attention_method(n)]
        has_attention = type(self).attention_graph is not Adapter.attention_graph and self.has_attention()
        if isinstance(method, str) and method.strip().lower() == "all":
            return available_methods() + (attention if has_attention else [])
        names = method_names(method)
        refused = [n for n in names if is_attention_method(n)]
        if refused and not has_attention:
            usable = ", ".join(n for n in available_methods(pixel=True, attention=False))
            raise ValueError(f"{', '.join(refused)} explain(s) a model through its attention to the image, and "
                             f"{self.name!r} ({type(self.model).__name__}) has none; methods that apply to it: {usable}")
        return names

    def has_attention(self) -> bool:
        return True

    # the forward's autocast dtype (None: float32); set by ``place`` (``load(..., dtype=)``)
    dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on: inputs go there, maps come back on the CPU (the
        CPU for an adapter that holds no model yet)."""
        model = getattr(self, "model", None)
        return module_device(model) if isinstance(model, nn.Module) else torch.device("cpu")

    def place(self, device: DeviceSpec = "auto", dtype: DtypeSpec = None) -> "Adapter":
        """Move the model to ``device`` ("auto": CUDA, else MPS, else the CPU) and run its forwards
        in ``dtype`` (autocast; None / "float32" for full precision). Returns self."""
        target = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if self.device != target and isinstance(getattr(self, "model", None), nn.Module):
            self.model.to(target)
        return self

    def to_device(self, inputs: Any) -> Any:
        """Input tensors moved to the model's device (preprocessing runs on the CPU)."""
        return to_device(inputs, self.device)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Entered around every forward the adapter makes: the forward's precision (autocast when a
        dtype was chosen); families add their own state on top (ViLT records its patch index)."""
        return autocast(self.device, self.dtype)


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class LoadRequest:
    """What ``captioning.load`` / ``vqa.load`` were asked for."""

    task: str
    source: str | Path | nn.Module
    processor: Any = None
    tokenizer: Any = None
    image_processor: Any = None
    trust_remote_code: bool = False


# source -> an adapter, or None when the source is not the loader's kind
Loader = Callable[[LoadRequest], "Adapter | None"]


@dataclass(frozen=True)
class Registration:
    """An adapter class and the models it handles: a transformers config ``model_type`` (a hub id
    or a save_pretrained directory) and a model class name (a model object)."""

    task: str
    adapter: type
    model_type: str | None = None
    model_class: str | None = None

    @property
    def family(self) -> str:
        return self.adapter.family


_LOADERS: list[tuple[int, str, Loader]] = []
_ADAPTERS: list[Registration] = []
A = TypeVar("A", bound=type)


def register_loader(name: str, *, fallback: bool = False) -> Callable[[Loader], Loader]:
    """Decorator: ``loader(request) -> Adapter | None`` is tried by ``load_adapter``; fallback
    loaders (those that accept anything, such as a hub id) are tried last."""
    def add(loader: Loader) -> Loader:
        _LOADERS[:] = [entry for entry in _LOADERS if entry[1] != name]  # re-registering replaces
        _LOADERS.append((1 if fallback else 0, name, loader))
        _LOADERS.sort(key=lambda entry: entry[0])  # stable: registration order within a priority
        return loader
    return add


def register_adapter(task: str, *, model_type: str | None = None,
                     model_class: str | None = None) -> Callable[[A], A]:
    """Class decorator: the adapter handles ``task`` for models of ``model_type`` / ``model_class``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def add(adapter: A) -> A:
        _ADAPTERS[:] = [r for r in _ADAPTERS if not (r.task == task and r.model_type == model_type
                                                      and r.model_class == model_class)]
        _ADAPTERS.append(Registration(task, adapter, model_type, model_class))
        return adapter
    return add


def registered_adapters(task: str) -> list[Registration]:
    return [r for r in _ADAPTERS if r.task == task]


def load_adapter(task: str, name: str | Path | nn.Module, processor: Any = None, *, tokenizer: Any = None,
                 image_processor: Any = None, trust_remote_code: bool = False, device: DeviceSpec = "auto",
                 dtype: DtypeSpec = None) -> Adapter:
    """The adapter for ``task`` ("captioning" or "vqa") from the first registered loader that
    accepts ``name`` (a shipped model's name, a directory, a hub id or a model object), its model
    on ``device`` with forwards in ``dtype`` (``Adapter.place``). A model object given with
    device="auto" stays where it is: only an explicit device moves the caller's model."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    # a bad device or dtype fails before any model is read
    chosen = resolve_device(device)
    resolve_dtype(dtype)
    request = LoadRequest(task, name, processor, tokenizer, image_processor, trust_remote_code)
    for _, _, loader in _LOADERS:
        adapter = loader(request)
        if adapter is not None:
            keep = isinstance(name, nn.Module) and (device is None or str(device).strip().lower() == "auto")
            return adapter.place(adapter.device if keep else chosen, dtype)
    raise ValueError(f"no registered model family loads {name!r} for {task} "
                     f"(loaders: {', '.join(n for _, n, _ in _LOADERS) or 'none'})")
