"""What the Hugging Face adapters share: loading offline (the registry's transformers loader),
word/token alignment through the tokenizer's offsets, processor geometry and normalization, the
question check, and finding encoder blocks by structure.

Names no family: each family file registers its adapter classes with ``register_adapter`` and
this module's loader finds them by the config's ``model_type`` or the model object's class."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmgradcam.engine import resolve_layer
from mmgradcam.engine.attention import AttentionGraph, AttentionLayer

from .captioning import Captioner, CaptionTokens
from .common import Adapter, LoadRequest, register_loader, registered_adapters
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


def last_block_name(root: nn.Module, encoder: nn.Module, from_end: int = 1) -> str:
    """The dotted name (under ``root``) of ``encoder``'s last block, or the ``from_end``-th from
    the end (an encoder of fewer blocks gives its first)."""
    blocks = encoder_blocks(encoder)
    return resolve_layer(root, blocks[-min(from_end, len(blocks))][1])[0]


def word_spans(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in WORD_SPAN.finditer(text)]


def first_words(text: str, count: int | None) -> str:
    """``text`` up to the end of its ``count``-th word (punctuation is not a word); all of it for None."""
    if count is None:
        return text
    ends = [end for word, _, end in word_spans(text) if is_word(word)]
    return text if len(ends) <= count else text[:ends[count - 1]]


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


class HFAdapter(Adapter):
    """What every transformers adapter shares: the tokenizer, the image processor (its geometry,
    measured once per image size, and its normalization) and the question check."""

    # the loader hands the whole processor to a family that lays out its inputs with it (chat VLMs)
    needs_processor = False
    # generate() reuses past keys/values (a checkpoint's config may say use_cache=false, e.g. after
    # training with gradient checkpointing); a family whose decoder cannot cache sets this False
    generation_cache = True
    # measures the image processor's geometry; a family whose processor does not return the image
    # as (3, h, w) pixels (Qwen2-VL's flattened patches) gives its own subclass
    geometry_class = ProcessorGeometry

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = self.geometry_class(image_processor)
        self.name = name

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        return self.processor.normalization

    def preprocess(self, image: ImageLike) -> tuple[dict[str, torch.Tensor], AxisAligned]:
        """The image processor's tensors for ``image`` and the geometry back to it."""
        pil = load_image(image)
        return self.processor.pixels(pil), self.processor.geometry((pil.height, pil.width))

    def encode_question(self, question: str, max_length: int) -> dict[str, torch.Tensor]:
        """The tokenized question (batch of one), refused when it has no words or only words the
        tokenizer maps to its unknown token."""
        if not isinstance(question, str) or not any(c.isalnum() for c in question):
            raise ValueError(f"question {question!r} is empty: it has no words")
        text = dict(self.tokenizer(question, return_tensors="pt", truncation=True, max_length=max_length))
        unknown = self.tokenizer.unk_token_id
        if unknown is not None:
            # compare ids with unk_token_id: get_special_tokens_mask counts [UNK] as special, which
            # would hide exactly the tokens this check is about
            specials = set(self.tokenizer.all_special_ids) - {unknown}
            content = [i for i in text["input_ids"][0].tolist() if i not in specials]
            if all(i == unknown for i in content):
                raise ValueError(f"question {question!r} has only words the model's tokenizer does not know")
        return text

    def question_inputs(self, image: ImageLike, question: str,
                        max_length: int) -> tuple[dict[str, torch.Tensor], AxisAligned]:
        """The tokenizer's and the image processor's tensors for a question about ``image``."""
        text = self.encode_question(question, max_length)
        pixels, geometry = self.preprocess(image)
        return {**text, **pixels}, geometry


class HFCaptioner(HFAdapter, Captioner):
    """A captioner over a transformers model with a causal text decoder.

    Subclasses say how token ids are fed (``input_key``, ``prepare_ids``), where text logits
    start (``text_logits_from_end``) and which layer to explain."""

    input_key = "input_ids"
    mask_key = "attention_mask"
    max_new_tokens = 30
    # an encoder-decoder's decoder reads the caption after its start token (set per instance)
    decoder_start_id: int | None = None

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?"):
        super().__init__(model, tokenizer, image_processor, name)
        self.max_tokens = self._max_tokens()

    def _max_tokens(self) -> int:
        return int(getattr(self.tokenizer, "model_max_length", 512) or 512)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def prepare_ids(self, ids: list[int], offsets: list[tuple[int, int]], special: list[bool]):
        """Family-specific edits of the tokenized caption (e.g. BLIP's decoder BOS); by default the
        decoder's start token in front when the family has one (``decoder_start_id``)."""
        if self.decoder_start_id is None:
            return ids, offsets, special
        return [self.decoder_start_id] + ids, [(0, 0)] + offsets, [True] + special

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
        input_ids = torch.tensor([ids], device=self.device)
        return CaptionTokens(input_ids=input_ids, words=words, word_positions=positions,
                             extra_inputs={self.mask_key: torch.ones_like(input_ids)}, text=caption)

    def batch_inputs(self, pixel_values: torch.Tensor, tokens: Sequence[CaptionTokens]) -> dict[str, torch.Tensor]:
        batch = self.collate(tokens)
        inputs = {"pixel_values": pixel_values, self.input_key: batch["input_ids"]}
        if self.mask_key in batch:
            inputs[self.mask_key] = batch[self.mask_key]
        return inputs

    def generation_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """What ``generate`` reads besides the options: the pixels (a family whose encoder also
        reads a prompt adds it)."""
        return {"pixel_values": pixel_values}

    def generate_ids(self, pixel_values: torch.Tensor, beam_size: int) -> torch.Tensor:
        with torch.no_grad(), self.forward_context():
            return self.model.generate(**self.to_device(self.generation_inputs(pixel_values)),
                                       max_new_tokens=self.max_new_tokens, num_beams=beam_size, do_sample=False,
                                       use_cache=self.generation_cache)

    def generate_batch(self, images: Sequence[ImageLike], beam_size: int = 1,
                       max_words: int | None = None) -> list[str]:
        pixels = torch.cat([self.preprocess(image)[0]["pixel_values"] for image in images])
        return self.generate_from_pixels(pixels, beam_size, max_words)

    def generate_from_pixels(self, pixel_values: torch.Tensor, beam_size: int = 1, max_words: int | None = None,
                             geometries: Sequence[Any] | None = None) -> list[str]:
        ids = self.generate_ids(pixel_values, beam_size)
        # the decoder counts tokens, not words: cut the decoded text after max_words words
        return [first_words(text.strip(), max_words)
                for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


# ----------------------------------------------------------------------------- loading
@register_loader("transformers", fallback=True)
def load_hf(request: LoadRequest) -> Adapter:
    """An adapter for a transformers model: a hub id, a local directory (save_pretrained), or a
    model object with its processor (or tokenizer and image processor). The adapter class is the
    one a family file registered for the config's ``model_type`` or the object's class."""
    import transformers

    task, model = request.task, request.source
    registrations = [r for r in registered_adapters(task) if r.model_class]
    if isinstance(model, nn.Module):
        by_class = {r.model_class: r for r in registrations}
        kind = type(model).__name__
        if kind not in by_class:
            raise ValueError(f"no {task} adapter for {kind}; supported: {', '.join(sorted(by_class))}")
        adapter = by_class[kind].adapter
        name = getattr(model.config, "_name_or_path", "") or kind
        source = None
    else:
        name = str(model)
        by_type = {r.model_type: r for r in registrations if r.model_type}
        config = from_pretrained(transformers.AutoConfig, name, request.trust_remote_code)
        model_type = getattr(config, "model_type", "?")
        if model_type not in by_type:
            raise ValueError(f"{name!r} is a {model_type!r} model; {task} supports: {', '.join(sorted(by_type))}")
        registration = by_type[model_type]
        adapter = registration.adapter
        model = from_pretrained(getattr(transformers, registration.model_class), name, request.trust_remote_code)
        source = name
    if getattr(adapter, "needs_processor", False):  # the family lays out its inputs with the whole processor
        processor = request.processor
        if processor is None:
            if source is None:
                raise ValueError(f"a {type(model).__name__} object needs its processor (processor=...)")
            processor = from_pretrained(transformers.AutoProcessor, source, request.trust_remote_code)
        return adapter(model, request.tokenizer or processor.tokenizer,
                       request.image_processor or processor.image_processor, name=name, processor=processor)
    tokenizer, image_processor = request.tokenizer, request.image_processor
    if request.processor is not None:
        tokenizer = tokenizer or getattr(request.processor, "tokenizer", None)
        image_processor = image_processor or getattr(request.processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        if source is None:
            raise ValueError("a model object needs its processor (or tokenizer= and image_processor=)")
        tokenizer = tokenizer or from_pretrained(transformers.AutoTokenizer, source, request.trust_remote_code)
        image_processor = image_processor or from_pretrained(transformers.AutoImageProcessor, source,
                                                             request.trust_remote_code)
    return adapter(model, tokenizer, image_processor, name=name)


# ----------------------------------------------------------------------------- attention methods
@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """transformers' eager attention for the call (the one that returns its probabilities), every
    sub-model's previous implementation restored after, also when an exception escapes."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = "eager"
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


def attention_modules(root: nn.Module, kinds: Mapping[str, str]) -> list[AttentionLayer]:
    """The modules under ``root`` whose dotted name ends with a key of ``kinds`` ("attention.self":
    "self", "crossattention.self": "cross", ...), in module order (the order the forward runs them)."""
    layers = []
    for name, module in root.named_modules():
        for suffix, kind in kinds.items():
            if name == suffix or name.endswith("." + suffix):
                layers.append(AttentionLayer(module, kind))
                break
    if not layers:
        raise ValueError(f"no attention modules ending in {', '.join(kinds)} under {type(root).__name__}")
    return layers


def vit_grid(vision_config: Any) -> tuple[int, int]:
    """(h, w) patch grid of a ViT-like vision config (image_size and patch_size from the model)."""
    size, patch = vision_config.image_size, vision_config.patch_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1])


def decoder_graph(model: nn.Module, decoder: nn.Module, vision_config: Any, kinds: Mapping[str, str]) -> AttentionGraph:
    """A text decoder cross-attending to a ViT's tokens (CLS first, then the patch grid)."""
    grid = vit_grid(vision_config)
    return AttentionGraph(attention_modules(decoder, kinds), grid, slice(1, 1 + grid[0] * grid[1]),
                          context=partial(eager_attention, model))
