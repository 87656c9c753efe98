"""What captioning and VQA adapters share."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from torch import nn

from mmgradcam.engine import resolve_layer


class Adapter:
    """Layer handling shared by every task adapter.

    ``model`` is what the engine runs; ``layer_root`` is the module layer names are relative to:
    the user's model, also when ``model`` wraps it (BLIP VQA's answer scorer)."""

    model: nn.Module
    family: str = "?"
    name: str = "?"
    default_layer: str = ""
    layer_reason: str = ""
    default_method: str = "gradcam"
    layer_options: dict[str, Any] = {}
    # image -> a short note when the image lies outside what the model knows (None: silent);
    # load_adapter sets the shapes-world check for the default family, other models know the world
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

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel (mean, std) mapping [0, 1] pixels to the model's input values."""
        return [0.5] * 3, [0.25] * 3  # the default models (geometry.to_tensor)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Entered around every forward the adapter makes (ViLT records its patch index)."""
        return contextlib.nullcontext()


def load_adapter(task: str, name: str | Path | nn.Module, processor: Any = None, *, tokenizer: Any = None,
                 image_processor: Any = None, trust_remote_code: bool = False) -> Adapter:
    """The adapter for ``task`` ("captioning" or "vqa"): the shipped default model, a directory
    holding a default-family model, or (through tasks.hf) a Hugging Face id, directory or object."""
    from . import default, hf

    if isinstance(name, (str, Path)) and (str(name) == "default" or default.is_default_directory(name)):
        from .shapes_world import domain_notice

        adapter = default.load_default(task, name)
        adapter.name = str(name)
        adapter.domain_check = partial(domain_notice, task=task)
        return adapter
    return hf.load_hf(name, task, processor=processor, tokenizer=tokenizer, image_processor=image_processor,
                      trust_remote_code=trust_remote_code)
