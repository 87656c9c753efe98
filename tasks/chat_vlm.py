"""Instruction-tuned VLMs whose image tokens sit in the language model's sequence (LLaVA-style):
what their families share, for captioning and VQA.

**Captioning**: the caption is the assistant's reply to a user turn of the image and a prompt
(``default_prompt``, "Describe the image." unless the family has its own; ``set_prompt`` /
``captioning.load(..., prompt=)`` changes it), laid out by the processor's chat template with the
generation prompt. Each word's target is the sum of its tokens' log-probabilities at the logits that
predict them (words merged from subword tokens through the tokenizer's offsets, as for BLIP / GIT).
**VQA** is generative: the user turn is the image and ``question_prompt`` (the question), an answer's
score the sum of its tokens' log-probabilities as the reply; candidates come from generation or are
given, and K answers are scored in one forward (K rows over one encoded image).

**Where the map comes from**: any layer. A layer of the vision encoder (the family's preset is
usually the block the projector reads) gives its patch tokens on the vision grid (prefix tokens such
as CLS dropped); a layer of the language model gives its hidden states at the image tokens' positions
(``image_token_id`` in ``input_ids``, where transformers 5.x ``masked_scatter``s the image features),
on the same grid. The positions are recorded from ``input_ids`` during each forward (``forward_context``).

What a family file provides (``tasks/llava.py`` is the example), on a class it mixes into
``ChatCaptioner`` and ``ChatVQA`` and registers with ``register_adapter``:

- ``family``, ``layer_reason`` and ``preset_layer()``: the dotted name (under the transformers model)
  of the layer explained by default;
- optional: ``default_prompt`` (the captioning prompt), ``question_prompt`` (a format string with
  ``{question}``), ``vision_grid()`` (default: the vision config's image_size / patch_size),
  ``image_token_grid()`` (the grid of the image tokens in the language model's sequence; default the
  vision grid, smaller where the projector pools patches), ``image_outputs(pixel_inputs)`` (the image
  encoded once; default ``get_image_features``, whose ``pooler_output`` holds one (tokens, dim)
  tensor per image), ``vision_tower`` (default: the base model's ``vision_tower``),
  ``language_model`` (default: ``get_decoder()``), ``image_token_id`` (default: the config's),
  ``sequence_inputs(input_ids, reply_start)`` (per-token inputs the forward needs besides the ids
  and the attention mask, e.g. ``token_type_ids`` that make a prefix or the image tokens attend
  bidirectionally; passed in every forward and generation).

A family without a chat template sets ``uses_chat_template = False`` and lays the text out itself:
``prompt_text(text)`` (the processor's text for a user turn of ``text``) and ``reply_tokens(reply)``
(the reply's ids and offsets as they follow the prompt).

A family whose image-token count depends on the image size (Qwen2-VL, LLaVA-NeXT, Idefics3 with
splitting) also overrides ``prompt_ids``: the base lays out a captioning prompt once, with a probe
image; its captioner and answerer mix in ``LayoutPerImageCaptioner`` / ``LayoutPerImageVQA`` (one
forward per image layout). A family whose image is read as tiles and a whole-image view (LLaVA-NeXT,
Idefics3) stitches the tiles with ``stitch_tiles`` and combines the views with ``side_by_side`` /
``summed_views``; its vision layers hold ``views_per_image()`` rows per image. Image tokens with
other tokens between them (Idefics3's tile separators) are fine: the attention methods' image
columns span them and ``image_token_placement`` reads the image tokens alone.

An encoder-decoder whose encoder holds the image tokens and the prompt (Florence-2) reads its
image-token positions from ``sequence_module``'s ``input_ids`` (its VQA wrapper's: the encoder's
sequence), and its answers from the decoder: ``reply_offset`` 0 (the decoder's rows hold the answer
alone) and ``reply_prefix`` (the decoder's start tokens in front of every answer, not scored).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import mmgradcam as mg
from mmgradcam.engine import preserved_state, resolve_layer
from mmgradcam.engine.attention import AttentionGraph
from mmgradcam.engine.explanation import Explanation
from mmgradcam.engine.layouts import FunctionLayout
from mmgradcam.engine.registry import is_attention_method, is_pixel_method
from mmgradcam.targets import logits_of

from .captioning import CaptionTokens
from .geometry import AxisAligned, ImageLike, load_image
from .hf import (HFAdapter, HFCaptioner, align_words, attention_modules, eager_attention, first_words, vit_grid,
                 word_spans)
from .text import is_word
from .vqa import Difference, VQAModel

MAX_PREFIX_TOKENS = 16  # vision tokens before the patch grid (CLS, registers) that a layout drops


def stitch_tiles(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Channels-last tiles (..., rows*cols, h, w, C), row by row as the processors cut them ->
    the one grid they tile (..., rows*h, cols*w, C)."""
    *lead, _, h, w, channels = tiles.shape
    grid = tiles.reshape(*lead, rows, cols, h, w, channels).transpose(-4, -3)
    return grid.reshape(*lead, rows * h, cols * w, channels)


def side_by_side(whole: torch.Tensor, tiles: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Channels-last views (..., g, g', C) of the whole image and (..., h, w, C) of its tiles ->
    (..., 2C, h, w): the tile grid's channels, then the whole view's spread over the tile grid:
    ``mode`` "bilinear" (upsampled), or "repeat" (each cell over the tile cells it covers, the tile
    grid a whole multiple of it)."""
    *lead, h, w, channels = tiles.shape
    g, g2 = whole.shape[-3], whole.shape[-2]
    spread = whole.float().movedim(-1, -3)
    if mode == "repeat":
        if h % g or w % g2:
            raise ValueError(f"a {g}x{g2} grid does not repeat onto a {h}x{w} grid")
        spread = spread.repeat_interleave(h // g, dim=-2).repeat_interleave(w // g2, dim=-1)
    else:
        spread = F.interpolate(spread.reshape(-1, channels, g, g2), size=(h, w), mode=mode,
                               align_corners=False).reshape(*lead, channels, h, w)
    return torch.cat([tiles.float().movedim(-1, -3), spread], dim=-3)


def summed_views(whole: torch.Tensor, tiles: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """(..., g, g', C) and (..., h, w, C) -> (..., C, h, w): the tile grid plus the whole view's
    spread over it (``side_by_side``)."""
    both = side_by_side(whole, tiles, mode)
    channels = tiles.shape[-1]
    return both[..., :channels, :, :] + both[..., channels:, :, :]



@lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward computes only its last k logits on request (``logits_to_keep``:
    most transformers VLMs; not BLIP-2 / InstructBLIP)."""
    return _forward_takes_logits_to_keep(type(model))

class ChatVLM(HFAdapter):
    """What chat captioners and answerers share: the processor and its chat template, the prompt
    and reply layout, the image-token positions, the grid layout for any layer, the joint attention
    graph of the language model. See the module docstring for what a family provides."""

    needs_processor = True  # the loader passes the family's processor (chat template, image tokens)
    uses_chat_template = True  # False: the family overrides prompt_text and reply_tokens
    # what the model reads instead of a (B, C, H, W) image, for a family whose pixel input is not one
    # (Qwen2-VL's flattened patches, LLaVA-NeXT's tiles): the pixel-space methods are refused, naming it
    pixel_input: str | None = None
    image_input_keys = ("pixel_values",)  # the image processor's outputs the vision tower reads
    default_prompt = "Describe the image."
    question_prompt = "{question}"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        if processor is None or not callable(processor) or (
                self.uses_chat_template and not callable(getattr(processor, "apply_chat_template", None))):
            raise ValueError(f"{type(model).__name__} needs its processor (processor=..., e.g. "
                             "AutoProcessor.from_pretrained(...)): it lays out the chat and the image tokens")
        if self.uses_chat_template and not (getattr(processor, "chat_template", None)
                                            or getattr(tokenizer, "chat_template", None)):
            raise ValueError(f"the processor of {type(model).__name__} has no chat template")
        self.chat = processor
        self.prompt = self.default_prompt
        self._prompt_cache: dict[str, list[int]] = {}
        self._image_rows: torch.Tensor | None = None  # (rows, L) image-token mask of the last forward
        super().__init__(self.engine_model(model.eval()), tokenizer, image_processor, name)
        self.max_tokens = self._max_tokens()
        self.default_layer = self.preset_layer()
        # a family whose layout depends on the image adds the images' input_size for the duration
        self._layout_options = {"layout": FunctionLayout(self._tokens_to_grid, batch_size=self._samples)}
        self.layer_options = dict(self._layout_options)
        self._install_output_hooks()

    # ------------------------------------------------------------------ what a family may override
    def engine_model(self, model: nn.Module) -> nn.Module:
        """The module the engine runs (captioning: the model itself)."""
        return model

    @property
    def vlm(self) -> nn.Module:
        """The transformers model (read through ``model``, so a copy with another model works)."""
        return self.model

    def preset_layer(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} names no preset layer (preset_layer)")

    def vision_grid(self) -> tuple[int, int]:
        return vit_grid(self.vlm.config.vision_config)

    def image_token_grid(self) -> tuple[int, int]:
        """The grid of the image tokens in the language model's sequence (row-major)."""
        return self.vision_grid()

    def sequence_inputs(self, input_ids: torch.Tensor, reply_start: int) -> dict[str, torch.Tensor]:
        """Per-token inputs besides the ids and the attention mask for a (B, L) sequence whose
        reply (caption or answer) starts at ``reply_start`` (none by default)."""
        return {}

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.base_model.vision_tower

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.get_decoder()

    @property
    def image_token_id(self) -> int:
        config = self.vlm.config
        value = getattr(config, "image_token_id", None)
        return int(value if value is not None else config.image_token_index)

    def image_outputs(self, pixel_inputs: Mapping[str, torch.Tensor]) -> Any:
        """The image(s) encoded once: an output whose ``pooler_output`` holds one (tokens, dim)
        tensor per image, as the model's forward takes it in ``mm_encoder_outputs["image"]``."""
        return self.vlm.get_image_features(**pixel_inputs, return_dict=True)

    def pixel_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's image inputs for the preprocessed pixels of a call's images (the pixels
        alone unless the family's model needs more, e.g. LLaVA-NeXT's ``image_sizes``)."""
        return {"pixel_values": pixel_values}

    def image_token_placement(self) -> Any:
        """None: the image tokens are the image-token grid in raster order; otherwise a function
        (T, B, image tokens) -> (T, B, h, w) for the attention methods' maps (``AttentionGraph.placement``)."""
        return None

    def method_choice(self, method: Any) -> list[str]:
        names = super().method_choice(method)
        pixel = [n for n in names if is_pixel_method(n)]
        if pixel and self.pixel_input is not None:
            raise ValueError(f"{pixel[0]} needs the image input as (B, C, H, W) pixels; {type(self.vlm).__name__} "
                             f"reads {self.pixel_input}: use a CAM or attention method")
        return names

    # ------------------------------------------------------------------ layers
    @property
    def layer_root(self) -> nn.Module:
        return self.vlm

    def in_language_model(self, layer: nn.Module | str | None) -> bool:
        """True for a layer that runs on the text sequence (the language model or its head)."""
        spec = self.default_layer if layer is None else layer
        module = spec if isinstance(spec, nn.Module) else resolve_layer(self.vlm, spec)[1]
        inside = set(map(id, self.language_model.modules()))
        head = self.vlm.get_output_embeddings()
        if head is not None:
            inside |= set(map(id, head.modules()))
        return id(module) in inside

    @property
    def sequence_module(self) -> nn.Module:
        """The module whose forward's ``input_ids`` lay out the sequence the image tokens sit in
        (default: the transformers model; an encoder-decoder's VQA wrapper reads the encoder's)."""
        return self.vlm

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """The forward's precision, and the image tokens' positions recorded from ``input_ids``
        (a pre-hook on the model for the duration, removed after, also on errors)."""
        def record(module: nn.Module, args: Any, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor) and ids.dim() == 2:
                self._image_rows = (ids == self.image_token_id).detach()

        handle = self.sequence_module.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with super().forward_context():
                yield
        finally:
            handle.remove()

    def image_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, h*w) sequence positions of the image grid's tokens from a (B, L) image-token mask
        (the same count in every row; tokens before the grid, such as a kept CLS, are left out)."""
        h, w = self.image_token_grid()
        counts = rows.sum(dim=1)
        if counts.numel() == 0 or bool((counts != counts[0]).any()) or int(counts[0]) < h * w:
            raise ValueError(f"expected {h * w} image tokens in every row ({h}x{w} grid), found "
                             f"{counts.tolist()}")
        positions = torch.nonzero(rows)[:, 1].reshape(rows.shape[0], -1)
        return positions[:, -h * w:]

    def views_per_image(self) -> int:
        """The rows a vision layer holds per image (a family that reads tiles: its views)."""
        return 1

    def _is_sequence(self, tensor: torch.Tensor, lead: int) -> bool:
        """True for a (..., B, L, C) output over the language model's sequence of the last forward."""
        rows = self._image_rows
        return rows is not None and tensor.shape[lead] == rows.shape[1] and tensor.shape[lead - 1] == rows.shape[0]

    def _samples(self, activation: torch.Tensor) -> int:
        """The images in a layer output: the sequence's rows, or a vision layer's rows per image."""
        if self._is_sequence(activation, 1):
            return int(activation.shape[0])
        return int(activation.shape[0]) // self.views_per_image()

    def image_token_states(self, tensor: torch.Tensor, lead: int) -> torch.Tensor:
        """(..., B, L, C) over the language model's sequence -> (..., B, n, C) at the image tokens
        (``image_positions`` of the last forward's ids)."""
        positions = self.image_positions(self._image_rows).to(tensor.device)  # (B, n)
        index = positions.reshape(*([1] * (lead - 1)), *positions.shape, 1)
        return tensor.gather(lead, index.expand(*tensor.shape[:lead], positions.shape[1], tensor.shape[-1]))

    def _tokens_to_grid(self, tensor: torch.Tensor, lead: int) -> torch.Tensor:
        """(..., B, N, C) tokens -> (..., B, C, h, w). N the language model's sequence length: the
        hidden states at the image tokens (on the image-token grid); otherwise vision tokens, prefix
        tokens dropped, or the projector's image tokens."""
        h, w = self.vision_grid()
        th, tw = self.image_token_grid()
        count = tensor.shape[lead]
        rows = self._image_rows
        if self._is_sequence(tensor, lead):
            h, w = th, tw
            picked = self.image_token_states(tensor, lead)
        elif 0 <= count - h * w <= MAX_PREFIX_TOKENS:
            picked = tensor[..., count - h * w:, :]
        elif count == th * tw:  # a projector that pools the patches (its output, one token per image token)
            h, w = th, tw
            picked = tensor
        else:
            length = "unknown" if rows is None else rows.shape[1]
            raise ValueError(f"a layer output of {count} tokens is neither the vision encoder's ({h}x{w} grid "
                             f"after up to {MAX_PREFIX_TOKENS} prefix tokens), the image tokens' ({th}x{tw}) nor "
                             f"the language model's sequence ({length} tokens)")
        return picked.reshape(*picked.shape[:-2], h, w, picked.shape[-1]).movedim(-1, lead)

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> AttentionGraph:
        """One sequence of text and image tokens in the language model: every decoder block's
        self-attention is joint; the image columns span the image tokens' positions, text row r is
        sequence position r (the rows the word and answer targets are read at)."""
        layers = attention_modules(self.language_model, {"self_attn": "joint"})
        return AttentionGraph(layers, self.image_token_grid(), self.image_columns(inputs),
                              context=partial(eager_attention, self.vlm), placement=self.column_placement(inputs))

    def sequence_image_positions(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(n,): the image grid's positions in the sequence of ``inputs["input_ids"]`` (the same in every row)."""
        positions = self.image_positions(inputs["input_ids"] == self.image_token_id)
        if not bool((positions == positions[:1]).all()):
            raise ValueError("the image tokens sit at different positions in the rows of one forward")
        return positions[0]

    def image_columns(self, inputs: Mapping[str, torch.Tensor]) -> slice:
        """The columns from the first image token of the grid to the last."""
        positions = self.sequence_image_positions(inputs)
        return slice(int(positions[0]), int(positions[-1]) + 1)

    def column_placement(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        """The attention methods' placement of the image columns: ``image_token_placement``, the
        tokens between the image tokens (Idefics3's tile separators), where there are any, left out."""
        positions = self.sequence_image_positions(inputs)
        place = self.image_token_placement()
        offsets = (positions - positions[0]).cpu()
        if int(offsets[-1]) + 1 == len(offsets):  # contiguous
            return place
        h, w = self.image_token_grid()

        def pick(columns: torch.Tensor) -> torch.Tensor:
            image = columns[..., offsets.to(columns.device)]
            return place(image) if place is not None else image.reshape(*image.shape[:-1], h, w)
        return pick

    # ------------------------------------------------------------------ the chat layout
    def set_prompt(self, prompt: str) -> None:
        """The user turn's text for captioning (the image comes first)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        self.prompt = prompt

    def conversation(self, text: str, reply: str | None = None) -> list[dict]:
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        if reply is not None:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        return turns

    def prompt_text(self, text: str) -> str:
        """The chat up to the assistant's reply: the user turn (image, ``text``) and the generation prompt."""
        return self.chat.apply_chat_template(self.conversation(text), add_generation_prompt=True, tokenize=False)

    def _special_tokens(self, text: str) -> dict:
        # a template that writes the BOS itself must not get a second one from the tokenizer
        bos = getattr(self.tokenizer, "bos_token", None)
        return {"add_special_tokens": not (bos and text.startswith(bos))}

    def prompt_inputs(self, text: str, image: Image.Image) -> dict[str, torch.Tensor]:
        """The processor's tensors for the prompt (user turn ``text``) on ``image``: the pixels and
        the prompt's ids, its image token expanded to one per image feature."""
        prompt = self.prompt_text(text)
        inputs = dict(self.chat(images=image, text=prompt, return_tensors="pt", **self._special_tokens(prompt)))
        inputs.pop("labels", None)  # a processor's training labels (PaliGemma-style), never an input here
        ids = inputs["input_ids"]
        return {**inputs, **self.sequence_inputs(ids, ids.shape[1])}

    def probe_image(self) -> Image.Image:
        return Image.new("RGB", (64, 48), (128, 128, 128))

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's ids with the image tokens expanded, laid out once per prompt with a probe
        image (the image-token count of these families does not depend on the image)."""
        if text not in self._prompt_cache:
            self._prompt_cache[text] = self.prompt_inputs(text, self.probe_image())["input_ids"][0].tolist()
        return self._prompt_cache[text]

    def reply_tokens(self, reply: str) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """``reply`` tokenized as the assistant's reply: its ids, character offsets within ``reply``
        and special-token flags, as they follow the generation prompt in the chat template."""
        prompt = self.prompt_text(self.prompt)
        full = self.chat.apply_chat_template(self.conversation(self.prompt, reply), tokenize=False)
        start = full.find(reply, len(prompt)) if full.startswith(prompt) else -1
        # the text between the generation prompt and the reply (LLaVA: a space); the template's
        # end of turn after the reply is not scored, so it is left out
        text = full[:start] + reply if start >= 0 else prompt + reply
        start = start if start >= 0 else len(prompt)
        special = self._special_tokens(text)
        before = self.tokenizer(prompt, **special)["input_ids"]
        encoded = self.tokenizer(text, return_offsets_mapping=True, **special)
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        if ids[:len(before)] == list(before):
            first = len(before)
        else:  # the reply's first token merged with the prompt's end: keep the tokens that start in the reply
            first = next((i for i, (s, _) in enumerate(offsets) if s >= len(prompt)), len(ids))
        specials = set(self.tokenizer.all_special_ids)
        ids = ids[first:]
        offsets = [(max(s - start, 0), max(e - start, 0)) for s, e in offsets[first:]]
        return ids, offsets, [i in specials for i in ids]

    # ------------------------------------------------------------------ transformers' own hooks
    def _install_output_hooks(self) -> None:
        """transformers 5.x installs its hidden-state recording hooks on a model's first forward
        that asks for hidden states (the vision tower, for the projector's layer) and marks the
        model as hooked. That first forward runs here, outside any call that restores the model's
        hooks: a restore that removed them would leave the model marked but unable to return its
        hidden states."""
        pixels, _ = self.preprocess(self.probe_image())
        with torch.no_grad(), self.forward_context():
            self.image_outputs(self.to_device({k: v for k, v in pixels.items() if k in self.image_input_keys}))

    def _max_tokens(self) -> int:
        config = getattr(self.vlm.config, "text_config", self.vlm.config)
        return int(getattr(config, "max_position_embeddings", 0) or 4096)


# ----------------------------------------------------------------------------- captioning
class ChatCaptioner(ChatVLM, HFCaptioner):
    """Captioning as the assistant's reply to the image and ``prompt``."""

    image_tokens_in_text = True  # TAM reads the LM head at the image tokens of the sequence
    text_logits_from_end = True  # with ``logit_window``, the logits hold the sequence's last positions only

    def logit_window(self, tokens: Sequence[CaptionTokens]) -> dict[str, Any]:
        """``logits_to_keep``: the logits from the first one that scores a word to the sequence's end
        (the LM head then runs, and is differentiated, at the reply's positions only)."""
        if not takes_logits_to_keep(self.vlm):
            return {}
        length = max(t.input_ids.shape[1] for t in tokens)
        first = min(p for t in tokens for word in t.word_positions for p, _ in word)
        return {"logits_to_keep": length - first}

    def tokenize(self, caption: str) -> CaptionTokens:
        if not isinstance(caption, str) or not any(is_word(w) for w, _, _ in word_spans(caption)):
            raise ValueError(f"caption {caption!r} is empty: it has no words to explain")
        prompt = self.prompt_ids(self.prompt)
        reply, offsets, special = self.reply_tokens(caption)
        ids = prompt + reply
        if len(ids) > self.max_tokens:
            raise ValueError(f"prompt and caption have {len(ids)} tokens; the model's limit is {self.max_tokens}")
        words, token_lists = align_words(caption, offsets, special)
        if not words:
            raise ValueError(f"caption {caption!r} has no words the tokenizer maps to tokens")
        # the logit at position p - 1 predicts the token at p; the reply starts after the prompt
        positions = [[(len(prompt) + t - 1, reply[t]) for t in tokens] for tokens in token_lists]
        input_ids = torch.tensor([ids], device=self.device)
        extra = {self.mask_key: torch.ones_like(input_ids), **self.sequence_inputs(input_ids, len(prompt))}
        return CaptionTokens(input_ids=input_ids, words=words, word_positions=positions, extra_inputs=extra,
                             text=caption)

    def batch_inputs(self, pixel_values: torch.Tensor, tokens: Sequence[CaptionTokens]) -> dict[str, torch.Tensor]:
        """The pixels and every collated text input (the ids, the mask and the sequence inputs)."""
        return {**self.pixel_inputs(pixel_values), **self.collate(tokens)}

    def generate_from_pixels(self, pixel_values: torch.Tensor, beam_size: int = 1, max_words: int | None = None,
                             geometries: Sequence[Any] | None = None) -> list[str]:
        """The replies to the prompt for images already preprocessed (``generate_batch`` and the
        eval pipeline's decoded batches)."""
        pixels = pixel_values
        prompt = self.prompt_ids(self.prompt)
        # one row per image (packed pixels, as Qwen2-VL's, hold more rows than images: their geometries count them)
        ids = torch.tensor([prompt] * (len(pixels) if geometries is None else len(geometries)), device=self.device)
        with torch.no_grad(), preserved_state(self.vlm), self.forward_context():
            out = self.vlm.generate(**self.to_device(self.pixel_inputs(pixels)), input_ids=ids,
                                    attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                    num_beams=beam_size, do_sample=False, use_cache=self.generation_cache,
                                    **self.sequence_inputs(ids, ids.shape[1]))
        texts = self.tokenizer.batch_decode(out[:, len(prompt):], skip_special_tokens=True)
        return [first_words(text.strip(), max_words) for text in texts]

    def image_token_logits(self, output: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """The LM head's logits at the image grid's tokens of the sequence, placed on the grid by
        ``image_token_placement`` where the family has one (several views of an image: summed)."""
        logits = logits_of(output)
        positions = self.image_positions(inputs["input_ids"] == self.image_token_id).to(logits.device)
        picked = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))  # (B, n, V)
        place = self.image_token_placement()
        if place is not None:
            picked = place(picked.transpose(1, 2)).flatten(2).transpose(1, 2)  # (B, V, h, w) -> (B, h*w, V)
        return picked, self.image_token_grid()


class LayoutPerImage:
    """What a family whose image-token layout depends on the image (Qwen2-VL's patch grid,
    LLaVA-NeXT's any-resolution tiles, Idefics3's tile grid) shares for captioning and VQA: the images of a call grouped
    by layout, one forward (and one batched backward) per layout, images of one layout sharing one.

    The family provides ``layout_key(geometry)`` (equal for images that share a forward), the
    context managers ``images_at(geometries)`` and ``images_in(model_inputs, layer=None)`` (for
    the duration: the layout of those images, as the prompt, the pixel inputs and the layer's
    layout need it) and ``split_pixels(pixel_values, geometries)`` (preprocessed pixels of several
    images, one tensor per image, which ``torch.cat`` joins back for a group)."""

    @contextlib.contextmanager
    def laid_out(self, input_size: tuple[int, int], **state: Any) -> Iterator[None]:
        """For the duration: the family's per-layout attributes ``state`` and the layer options
        whose maps are upsampled to ``input_size`` (the resized image). Restored after, also on errors."""
        saved = {name: getattr(self, name) for name in state}, self.layer_options
        try:
            for name, value in state.items():
                setattr(self, name, value)
            self.layer_options = {**self._layout_options, "input_size": input_size}
            yield
        finally:
            for name, value in saved[0].items():
                setattr(self, name, value)
            self.layer_options = saved[1]

    def group(self, geometries: Sequence[Any]) -> dict[Any, list[int]]:
        """The indices of ``geometries`` grouped by layout (in order): one forward per group."""
        groups: dict[Any, list[int]] = {}
        for i, geometry in enumerate(geometries):
            groups.setdefault(self.layout_key(geometry), []).append(i)
        return groups

    def per_layout(self, geometries: Sequence[Any], run: Callable[[list[int]], Sequence[Any]]) -> list[Any]:
        """``run(indices)`` for each layout's images (inside ``images_at``), one result per image,
        the results put back in the images' order."""
        results: list[Any] = [None] * len(geometries)
        for index in self.group(geometries).values():
            with self.images_at([geometries[i] for i in index]):
                found = run(index)
            for i, result in zip(index, found):
                results[i] = result
        return results

    def image_geometry(self, image: Image.Image) -> AxisAligned:
        return self.processor.geometry((image.height, image.width))

    def explain_prepared(self, inputs: dict[str, torch.Tensor], geometry: Any, text: str, *args: Any,
                         **kwargs: Any) -> Any:
        with self.images_in(inputs):
            return super().explain_prepared(inputs, geometry, text, *args, **kwargs)


class LayoutPerImageCaptioner(LayoutPerImage, ChatCaptioner):
    """Captioning with one forward per image layout (see ``LayoutPerImage``)."""

    def prepare(self, image: ImageLike, text: str) -> tuple[dict[str, torch.Tensor], AxisAligned]:
        pil = load_image(image)
        with self.images_at([self.image_geometry(pil)]):
            return super().prepare(pil, text)

    def _explain_tokens(self, model_inputs: dict[str, torch.Tensor], tokens: Sequence[CaptionTokens],
                        geometries: Sequence[Any], **options: Any) -> list[Any]:
        with self.images_in(model_inputs, options.get("layer")):
            return super()._explain_tokens(model_inputs, tokens, geometries, **options)

    def explain_pixels(self, pixel_values: torch.Tensor, geometries: Sequence[Any], captions: Sequence[str],
                       **options: Any) -> list[Any]:
        """``Captioner.explain_pixels`` on the preprocessed pixels of several images (their layouts
        read from their geometries): one forward and one batched backward per layout."""
        if len(captions) != len(geometries):
            raise ValueError(f"explain_pixels needs one geometry and one caption per image: {len(geometries)} "
                             f"geometries, {len(captions)} captions")
        images = self.split_pixels(pixel_values, geometries)

        def explain(index: list[int]) -> list[Any]:
            tokens = [self.tokenize(captions[i]) for i in index]
            inputs = self.batch_inputs(torch.cat([images[i] for i in index]), tokens)
            return self._explain_tokens(inputs, tokens, [geometries[i] for i in index], **options)

        return self.per_layout(geometries, explain)

    def score_batch(self, images: Sequence[ImageLike], captions: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        if len(images) != len(captions):
            raise ValueError(f"{len(captions)} captions given for {len(images)} images")
        pils = [load_image(image) for image in images]
        score = super().score_batch
        return self.per_layout([self.image_geometry(pil) for pil in pils],
                               lambda index: score([pils[i] for i in index], [captions[i] for i in index], batch_size))

    def generate_batch(self, images: Sequence[ImageLike], beam_size: int = 1,
                       max_words: int | None = None) -> list[str]:
        prepared = [self.preprocess(image) for image in images]
        return self.generate_from_pixels(torch.cat([inputs["pixel_values"] for inputs, _ in prepared]), beam_size,
                                         max_words, geometries=[geometry for _, geometry in prepared])

    def generate_from_pixels(self, pixel_values: torch.Tensor, beam_size: int = 1, max_words: int | None = None,
                             geometries: Sequence[Any] | None = None) -> list[str]:
        """The replies to the prompt for the preprocessed pixels of several images, one generate
        per layout (read from the images' geometries)."""
        if geometries is None:
            raise ValueError(f"{type(self.vlm).__name__}'s image tokens depend on the image: generate_from_pixels "
                             "needs each image's geometry (geometries=, from preprocess)")
        images = self.split_pixels(pixel_values, geometries)
        generate = super().generate_from_pixels
        return self.per_layout(geometries, lambda index: generate(torch.cat([images[i] for i in index]), beam_size,
                                                                  max_words, [geometries[i] for i in index]))


# ----------------------------------------------------------------------------- VQA
class EncodedImageLM(nn.Module):
    """The chat VLM as the VQA engine's model: the image encoded once, its features put into K
    rows (the question turn, then candidate answer k) -> logits (K, L, V)."""

    def __init__(self, vlm: nn.Module, encode: Any, sequence_inputs: Any = None):
        super().__init__()
        self.vlm = vlm
        self.encode = encode  # pixel inputs -> image outputs (``ChatVLM.image_outputs``)
        self.sequence_inputs = sequence_inputs  # (ids, reply start) -> per-token inputs (``ChatVLM``)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_ids: torch.Tensor | None = None,
                answer_mask: torch.Tensor | None = None, **pixel_inputs: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        count = 1 if answer_ids is None else answer_ids.shape[0]  # no answers: the question turn alone
        ids, mask = input_ids, attention_mask
        if answer_ids is not None:
            ids = torch.cat([input_ids.expand(count, -1), answer_ids], dim=1)
            mask = torch.cat([attention_mask.expand(count, -1), answer_mask], dim=1)
        # the question's per-token inputs are laid out again for the K rows of question + answer
        extra = self.sequence_inputs(ids, input_ids.shape[1]) if self.sequence_inputs is not None else {}
        encoded = self.encode({k: v for k, v in pixel_inputs.items() if k not in extra})
        pooled = encoded.pooler_output  # one image, K rows: a list per image, or a tensor of its tokens
        if not isinstance(pooled, torch.Tensor):
            features = [f for f in pooled for _ in range(count)]
        elif pooled.dim() == 3:  # (1, tokens, dim)
            features = pooled.expand(count, *pooled.shape[1:])
        else:  # (tokens, dim), scattered in sequence order
            features = pooled.repeat(count, *([1] * (pooled.dim() - 1)))
        return self.vlm(input_ids=ids, attention_mask=mask, **extra, **self.reply_window(answer_ids),
                        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)}).logits

    def reply_window(self, answer_ids: torch.Tensor | None) -> dict[str, int]:
        """``logits_to_keep``: the logits from the question's last position (it predicts an answer's
        first token) to the end, where the model takes it: the LM head runs, and is differentiated,
        at the answers only (``AnswerLogProb`` reads logits aligned at the sequence's end)."""
        if answer_ids is None or not takes_logits_to_keep(self.vlm):
            return {}
        return {"logits_to_keep": answer_ids.shape[1] + 1}


class AnswerLogProb:
    """Target: the sum of log p(answer token) over candidate ``row``'s tokens -> (K,), the value
    in its own row and 0 in the others (a layer that runs on the K rows gets gradient only in its
    row; ``SummedRows`` makes it (1,) for a layer that runs on the one image)."""

    def __init__(self, row: int, positions: list[tuple[int, int]], sequence_length: int):
        # (sequence position, token id); the logits end at the sequence's last position (all of
        # them, or fewer: ``EncodedImageLM.reply_window``)
        self.row, self.positions, self.sequence_length = row, positions, sequence_length

    def __call__(self, logits: Any) -> torch.Tensor:
        logits = logits_of(logits)
        offset = logits.shape[1] - self.sequence_length
        if min(p for p, _ in self.positions) + offset < 0:
            raise ValueError(f"the logits hold the last {logits.shape[1]} of {self.sequence_length} positions; "
                             "an answer token is scored before them")
        pos = torch.tensor([p + offset for p, _ in self.positions], dtype=torch.long, device=logits.device)
        tok = torch.tensor([t for _, t in self.positions], dtype=torch.long, device=logits.device)
        value = torch.log_softmax(logits[self.row, pos].float(), dim=-1).gather(1, tok[:, None]).sum()
        return torch.zeros(logits.shape[0], dtype=value.dtype, device=logits.device).index_put(
            (torch.tensor([self.row], device=logits.device),), value.reshape(1))


class SummedRows:
    """A per-row target summed over the K rows: (1,) for the one image."""

    def __init__(self, target: Any):
        self.target = target

    def __call__(self, output: Any) -> torch.Tensor:
        return self.target(output).sum().reshape(1)


def summed_over_rows(exp: Explanation) -> Explanation:
    """An Explanation over the K answer rows as one over the image: each target's signed maps
    summed over the rows (a target has gradient only in its own row, a contrast in two), then the
    ReLU; scores and channel weights summed alike."""
    signed = exp.signed_layer_maps.sum(dim=1, keepdim=True)
    weights = exp.channel_weights
    return replace(exp, layer_maps=signed.clamp(min=0), signed_layer_maps=signed,
                   scores=exp.scores.sum(dim=1, keepdim=True), activations=exp.activations.new_empty(0),
                   gradients=None, channel_weights=None if weights is None else weights.sum(dim=1, keepdim=True))


class ChatVQA(ChatVLM, VQAModel):
    """Generative VQA: an answer's score is the sum of its tokens' log-probabilities as the
    assistant's reply to the image and the question; K answers are K rows over one encoded image."""

    max_answer_tokens = 10

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str = "?",
                 processor: Any = None):
        self._generated: dict[str, list[int]] = {}
        super().__init__(model, tokenizer, image_processor, name, processor)

    def engine_model(self, model: nn.Module) -> nn.Module:
        return EncodedImageLM(model, self.image_outputs, self.sequence_inputs)

    @property
    def vlm(self) -> nn.Module:
        return self.model.vlm

    def prepare(self, image: ImageLike, text: str) -> tuple[dict[str, torch.Tensor], AxisAligned]:
        self.encode_question(text, self.max_tokens)  # refuses an empty question or one of unknown words
        pil = load_image(image)
        inputs = self.prompt_inputs(self.question_prompt.format(question=text), pil)
        return inputs, self.processor.geometry((pil.height, pil.width))

    def _answer_ids(self, answer: str) -> list[int]:
        """A generated candidate keeps the ids it was generated with (decoding and re-tokenizing
        need not give the same tokens back); a given answer is tokenized as the reply."""
        if answer in self._generated:
            return self._generated[answer]
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"answer {answer!r} is empty")
        ids, _, special = self.reply_tokens(answer)
        unknown = self.tokenizer.unk_token_id
        if unknown is not None and unknown in ids:
            raise ValueError(f"answer {answer!r} has words the model's tokenizer does not know")
        return [i for i, s in zip(ids, special) if not s]

    def targets_for(self, inputs: dict[str, torch.Tensor], answers: Sequence[str],
                    score: str) -> tuple[dict[str, torch.Tensor], list[Any]]:
        prefix = self.reply_prefix()
        rows = [prefix + self._answer_ids(a) for a in answers]
        offset = self.reply_offset(inputs)
        if offset + max(len(r) for r in rows) > self.max_tokens:
            raise ValueError(f"question and answer exceed the model's {self.max_tokens} tokens")
        length = max(len(r) for r in rows)
        answer_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long, device=self.device)
        answer_mask = torch.zeros((len(rows), length), dtype=torch.long, device=self.device)
        for k, r in enumerate(rows):
            answer_ids[k, :len(r)] = torch.tensor(r, dtype=torch.long, device=self.device)
            answer_mask[k, :len(r)] = 1
        base = {k: v for k, v in inputs.items() if k not in ("answer_ids", "answer_mask")}
        # answer token t sits at offset + t; the logit before it predicts it (the prefix is not scored)
        targets = [AnswerLogProb(k, [(offset + t - 1, r[t]) for t in range(len(prefix), len(r))], offset + length)
                   for k, r in enumerate(rows)]
        return {**base, "answer_ids": answer_ids, "answer_mask": answer_mask}, targets

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def reply_offset(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Where the answer rows start in the sequence the logits (and ``generate``'s output) cover:
        after the question turn (an encoder-decoder's decoder holds the answer alone: 0)."""
        return int(inputs["input_ids"].shape[1])

    def reply_prefix(self) -> list[int]:
        """Ids in front of every answer in its row, read but not scored (an encoder-decoder's decoder
        start tokens; none in a chat)."""
        return []

    def run_engine(self, inputs: dict[str, torch.Tensor], targets: Sequence[Any], layer: nn.Module | str | None,
                   names: Sequence[str], attention: Mapping[str, Any], **options: Any) -> dict[str, Explanation]:
        """A layer of the image encoder runs once for the image: the targets are summed over the
        answer rows. The attention methods and a layer of the language model run on the K rows: each
        target's maps are summed over the rows (its gradient is zero outside its own rows)."""
        on_rows = [n for n in names if is_attention_method(n)]
        if self.in_language_model(layer):
            pixel = [n for n in names if is_pixel_method(n)]
            if pixel:
                raise ValueError(f"{pixel[0]} needs a layer of the image encoder, not of the language model")
            on_rows = list(names)
        once = [n for n in names if n not in on_rows]
        layer = self.resolve_layer(layer)
        exps: dict[str, Explanation] = {}
        with self.forward_context():
            if once:
                exps.update(mg.explain(self.model, inputs, [SummedRows(t) for t in targets], layer, once,
                                       image_key="pixel_values", **options, **self.layer_options))
            if on_rows:
                found = mg.explain(self.model, inputs, list(targets), layer, on_rows, image_key="pixel_values",
                                   **options, **self.layer_options, **attention)
                exps.update({n: summed_over_rows(e) for n, e in found.items()})
        return {n: exps[n] for n in names}

    def answer_readout(self, inputs: Mapping[str, torch.Tensor], targets: Sequence[Any]) -> torch.Tensor:
        """(T, K, L): each candidate's map is read in its own row at the positions that score its tokens."""
        rows, length = inputs["answer_ids"].shape[0], self.reply_offset(inputs) + inputs["answer_ids"].shape[1]
        readout = torch.zeros(len(targets), rows, length, device=inputs["answer_ids"].device)
        for t, target in enumerate(targets):
            if isinstance(target, Difference) or not getattr(target, "positions", None):
                raise ValueError("the attention methods explain answers (not a contrast) on chat VLMs")
            for pos, _ in target.positions:
                readout[t, target.row, pos] += 1.0 / len(target.positions)
        return readout

    def answer_target(self, answer: str, score: str = "logit") -> Any:
        raise NotImplementedError("chat VLM targets depend on the candidate batch: use targets_for")

    def answer_probabilities(self, inputs: dict[str, torch.Tensor], answers: Sequence[str]) -> list[float]:
        """exp(sum of the answer tokens' log-probabilities) for each answer, from one forward."""
        full, targets = self.targets_for(inputs, answers, "logprob")
        with torch.no_grad(), preserved_state(self.model), self.forward_context():
            logits = self.model(**self.to_device(full))
        return [float(torch.exp(t(logits)[t.row])) for t in targets]

    def ranked_answers(self, inputs: dict[str, torch.Tensor], top_k: int) -> list[tuple[str, float]]:
        """Beam-searched replies, ranked by their teacher-forced probability."""
        base = self.to_device({k: v for k, v in inputs.items() if k not in ("answer_ids", "answer_mask")})
        beams = max(top_k, 1)
        offset = self.reply_offset(base)
        with torch.no_grad(), preserved_state(self.vlm), self.forward_context():
            ids = self.vlm.generate(**base, num_beams=beams, num_return_sequences=beams, do_sample=False,
                                    max_new_tokens=self.max_answer_tokens, use_cache=self.generation_cache)
        specials = set(self.tokenizer.all_special_ids)
        candidates = []
        for row in ids[:, offset:].tolist():
            content = [i for i in row if i not in specials]
            text = self.tokenizer.decode(content).strip()
            if text and any(c.isalnum() for c in text):
                self._generated.setdefault(text, content)
                candidates.append(text)
        candidates = list(dict.fromkeys(candidates))
        if not candidates:
            return []
        scored = zip(candidates, self.answer_probabilities(base, candidates))
        return sorted(scored, key=lambda pair: pair[1], reverse=True)[:top_k]


class LayoutPerImageVQA(LayoutPerImage, ChatVQA):
    """Generative VQA whose layer layout depends on the image (see ``LayoutPerImage``)."""

    def run_engine(self, inputs: dict[str, torch.Tensor], targets: Sequence[Any], layer: nn.Module | str | None,
                   names: Sequence[str], attention: Mapping[str, Any], **options: Any) -> dict[str, Explanation]:
        with self.images_in(inputs, layer):
            return super().run_engine(inputs, targets, layer, names, attention, **options)
