"""What the Hugging Face adapters share: loading offline, word/token alignment through the
tokenizer's offsets, processor geometry, and finding encoder blocks by structure."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .captioning import Captioner, CaptionTokens
from .geometry import AxisAligned, ImageLike, load_image, probe_geometry
from .text import is_word

WORD_SPAN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def hub_error(name: str, error: Exception) -> OSError:
    return OSError(
        f"cannot load {name!r}: {error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
        "A Hugging Face model id needs the hub (network) or a local copy in the cache; offline, pass a "
        "directory saved with save_pretrained()."
    )


def from_pretrained(cls: Any, name: str | Path, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    text = str(name)
    if (text.startswith((".", "/", "~")) or Path(text).exists()) and not Path(text).expanduser().is_dir():
        raise FileNotFoundError(f"no such model directory {text!r}")
    try:
        return cls.from_pretrained(str(name), trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:
        raise hub_error(str(name), error) from None


def encoder_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of an encoder: the longest ModuleList of same-class modules.

    Found by structure, not attribute paths, so it works across transformers versions
    (ViT's blocks are ``encoder.layer`` in 4.x and ``layers`` in 5.x)."""
    best: list[tuple[str, nn.Module]] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > len(best):
            kinds = {type(m) for m in child}
            if len(kinds) == 1:
                best = [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(child)]
    if not best:
        raise ValueError(f"found no encoder blocks in {type(module).__name__}")
    return best


def module_name(root: nn.Module, module: nn.Module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError("module is not inside the model")


def word_spans(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in WORD_SPAN.finditer(text)]


def align_words(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[bool]) -> tuple[list[str], list[list[int]]]:
    """Words of ``text`` (punctuation excluded) and, for each, the indices of its tokens.

    A token belongs to the word whose character span contains the token's first non-space
    character; special tokens and empty spans belong to no word."""
    spans = [(w, s, e) for w, s, e in word_spans(text)]
    token_lists: list[list[int]] = [[] for _ in spans]
    for index, ((start, end), is_special) in enumerate(zip(offsets, special)):
        if is_special or end <= start:
            continue
        while start < end and text[start].isspace():
            start += 1
        for j, (_, s, e) in enumerate(spans):
            if s <= start < e:
                token_lists[j].append(index)
                break
    keep = [j for j, (w, _, _) in enumerate(spans) if is_word(w) and token_lists[j]]
    return [spans[j][0] for j in keep], [token_lists[j] for j in keep]


class ProcessorGeometry:
    """Runs an HF image processor and measures (once per image size) how it maps the image."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor
        self._cache: dict[tuple[int, int], AxisAligned] = {}

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        processor = self.image_processor
        if not getattr(processor, "do_normalize", True):
            return [0.0] * 3, [1.0] * 3
        mean, std = getattr(processor, "image_mean", 0.0), getattr(processor, "image_std", 1.0)
        as_list = lambda v: [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * 3  # noqa: E731
        return as_list(mean), as_list(std)

    def pixels(self, image) -> dict[str, torch.Tensor]:
        return dict(self.image_processor(images=image, return_tensors="pt"))

    def geometry(self, size: tuple[int, int]) -> AxisAligned:
        if size not in self._cache:
            def process(array: np.ndarray) -> torch.Tensor:
                out = self.image_processor(images=array, do_rescale=False, do_normalize=False, return_tensors="pt")
                return out["pixel_values"][0].float()

            self._cache[size] = probe_geometry(process, size)
        return self._cache[size]


class HFCaptioner(Captioner):
    """A captioner over a transformers model with a causal text decoder.

    Subclasses say how token ids are fed (``input_key``, ``prepare_ids``), where text logits
    start (``text_logits_from_end``) and which layer to explain."""

    input_key = "input_ids"
    mask_key = "attention_mask"
    max_new_tokens = 30

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = ProcessorGeometry(image_processor)
        self.name = name
        self.max_tokens = self._max_tokens()

    def _max_tokens(self) -> int:
        return int(getattr(self.tokenizer, "model_max_length", 512) or 512)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        return self.processor.normalization

    def preprocess(self, image: ImageLike) -> tuple[dict[str, torch.Tensor], AxisAligned]:
        pil = load_image(image)
        return self.processor.pixels(pil), self.processor.geometry((pil.height, pil.width))

    def prepare_ids(self, ids: list[int], offsets: list[tuple[int, int]], special: list[bool]):
        """Family-specific edits of the tokenized caption (e.g. BLIP's decoder BOS)."""
        return ids, offsets, special

    def tokenize(self, caption: str) -> CaptionTokens:
        if not isinstance(caption, str) or not any(is_word(w) for w, _, _ in word_spans(caption)):
            raise ValueError(f"caption {caption!r} is empty: it has no words to explain")
        encoded = self.tokenizer(caption, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids, offsets, special = self.prepare_ids(list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]],
                                                 [bool(s) for s in encoded["special_tokens_mask"]])
        if len(ids) > self.max_tokens:
            raise ValueError(f"caption has {len(ids)} tokens; the model's limit is {self.max_tokens}")
        words, token_lists = align_words(caption, offsets, special)
        if not words:
            raise ValueError(f"caption {caption!r} has no words the tokenizer maps to tokens")
        # the logit at position t - 1 predicts token t (a first token is never scored)
        positions = [[(t - 1, ids[t]) for t in tokens if t >= 1] for tokens in token_lists]
        input_ids = torch.tensor([ids])
        return CaptionTokens(input_ids=input_ids, words=words, word_positions=positions,
                             extra_inputs={self.mask_key: torch.ones_like(input_ids)}, text=caption)

    def model_inputs(self, pixel_values: torch.Tensor, tokens: Sequence[CaptionTokens]) -> dict[str, torch.Tensor]:
        batch = self.collate(tokens)
        inputs = {"pixel_values": pixel_values, self.input_key: batch["input_ids"]}
        if self.mask_key in batch:
            inputs[self.mask_key] = batch[self.mask_key]
        return inputs

    def generate_ids(self, pixel_values: torch.Tensor, beam_size: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model.generate(pixel_values=pixel_values, max_new_tokens=self.max_new_tokens,
                                       num_beams=beam_size, do_sample=False)

    def generate_batch(self, images, beam_size: int = 1) -> list[str]:
        pixels = torch.cat([self.preprocess(image)[0]["pixel_values"] for image in images])
        ids = self.generate_ids(pixels, beam_size)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate(self, image: ImageLike, beam_size: int = 1, max_words: int | None = None) -> str:
        return self.generate_batch([load_image(image)], beam_size)[0]


# ----------------------------------------------------------------------------- loading
CAPTIONING_FAMILIES = {
    "blip": ("BlipForConditionalGeneration", "blip", "BlipCaptioner"),
    "git": ("GitForCausalLM", "git", "GitCaptioner"),
    "vision-encoder-decoder": ("VisionEncoderDecoderModel", "vit_gpt2", "VisionEncoderDecoderCaptioner"),
}
VQA_FAMILIES = {
    "blip": ("BlipForQuestionAnswering", "blip", "BlipVQA"),
    "vilt": ("ViltForQuestionAnswering", "vilt", "ViltVQA"),
}


def _adapter_class(module_name_: str, class_name: str):
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{module_name_}"), class_name)


def load_hf(model: str | Path | nn.Module, task: str, *, processor: Any = None, tokenizer: Any = None,
            image_processor: Any = None, trust_remote_code: bool = False):
    """An adapter for a transformers model: a hub id, a local directory (save_pretrained), or a
    model object with its processor (or tokenizer and image processor)."""
    import transformers

    families = CAPTIONING_FAMILIES if task == "captioning" else VQA_FAMILIES
    if isinstance(model, nn.Module):
        by_class = {cls: (adapter_module, adapter) for cls, adapter_module, adapter in families.values()}
        kind = type(model).__name__
        if kind not in by_class:
            raise ValueError(f"no {task} adapter for {kind}; supported: {', '.join(sorted(by_class))}")
        adapter_module, adapter = by_class[kind]
        name = getattr(model.config, "_name_or_path", "") or kind
        source = None
    else:
        name = str(model)
        config = from_pretrained(transformers.AutoConfig, name, trust_remote_code)
        model_type = getattr(config, "model_type", "?")
        if model_type not in families:
            raise ValueError(f"{name!r} is a {model_type!r} model; {task} supports: {', '.join(sorted(families))}")
        class_name, adapter_module, adapter = families[model_type]
        model = from_pretrained(getattr(transformers, class_name), name, trust_remote_code)
        source = name
    if processor is not None:
        tokenizer = tokenizer or getattr(processor, "tokenizer", None)
        image_processor = image_processor or getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        if source is None:
            raise ValueError("a model object needs its processor (or tokenizer= and image_processor=)")
        tokenizer = tokenizer or from_pretrained(transformers.AutoTokenizer, source, trust_remote_code)
        image_processor = image_processor or from_pretrained(transformers.AutoImageProcessor, source,
                                                             trust_remote_code)
    return _adapter_class(adapter_module, adapter)(model, tokenizer, image_processor, name=name)
