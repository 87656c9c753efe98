"""Captioning: per-word Grad-CAM maps for a caption, generated or given.

``load(name)`` gives a Captioner; ``Captioner.explain(image, caption=None)`` explains every word
of the caption from one forward pass and one batched backward (the engine), each word's target
being its log-probability given the image and the words before it (a word of several tokens sums
its tokens' log-probabilities). Maps come back at the original image size.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mmgradcam as mg
from mmgradcam.engine.device import DeviceSpec, DtypeSpec
from mmgradcam.engine.explanation import Explanation
from mmgradcam.engine.gradients import check_max_targets
from mmgradcam.engine.registry import MethodSpec, get_method, is_attention_method, is_readout_method, method_names
from mmgradcam.targets import logits_of

from .common import Adapter, load_adapter, registered_adapters
from .geometry import ImageLike, load_image


@dataclass
class CaptionTokens:
    """A caption as the model reads it under teacher forcing.

    word_positions[j] lists (logit position, token id) for every token of word j.
    """

    input_ids: torch.Tensor
    words: list[str]
    word_positions: list[list[tuple[int, int]]]
    extra_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    text: str = ""


def join_caption(tokens: CaptionTokens) -> str:
    return tokens.text or " ".join(tokens.words)


class LogSoftmaxCache:
    """One log-softmax of the logits shared by all word targets of a forward pass.

    ``sequence_length``: the logits end at the text sequence's last position, which has this many
    positions (models such as GIT put image positions before the text in their logits; a model asked
    for its last k logits only, ``logits_to_keep``, holds fewer): sequence position p is logit
    p - sequence_length + (the logits' length). None: logit p is position p.

    The cached log-probabilities hold the forward's autograd graph: they are dropped as soon as
    the logits they came from are (the caller's forward is done), so targets used again in a later
    call do not keep the earlier call's graph and activations alive."""

    def __init__(self, sequence_length: int | None = None) -> None:
        self.sequence_length = sequence_length
        self._logits: weakref.ref | None = None
        self._value: tuple[torch.Tensor, int] | None = None
        self._forward = 0  # which forward's logits the cached value belongs to

    def __call__(self, output: Any) -> tuple[torch.Tensor, int]:
        """(log-probabilities over the text positions the logits hold, the offset that turns a
        sequence position into an index of them)."""
        logits = logits_of(output)
        if self._value is None or self._logits is None or self._logits() is not logits:
            kept, offset = logits, 0
            if self.sequence_length is not None:
                kept = logits[:, -self.sequence_length:]
                offset = kept.shape[1] - self.sequence_length
            self._forward += 1
            self._logits, self._value = weakref.ref(logits), (torch.log_softmax(kept.float(), dim=-1), offset)
            weakref.finalize(logits, self._release, self._forward)
        return self._value

    def _release(self, forward: int) -> None:
        if forward == self._forward:  # not a later forward's value
            self._value = None


class TokensLogProb:
    """Target: for each sample b, the sum of log p(token | image, previous tokens) over
    ``positions[b]``, a list of (logit position, token id) -> (B,). A sample with an empty list
    scores 0 (nothing to explain for it: its map is empty)."""

    def __init__(self, positions: Sequence[Sequence[tuple[int, int]]], log_softmax: LogSoftmaxCache | None = None,
                 device: torch.device | str = "cpu"):
        rows = [(b, pos, tok) for b, sample in enumerate(positions) for pos, tok in sample]
        if not rows:
            raise ValueError("a word target needs at least one token position")
        self.batch = len(positions)
        self.owner, self.pos, self.tok = (torch.tensor(column, dtype=torch.long, device=device)
                                          for column in zip(*rows))
        self.first_position = min(pos for _, pos, _ in rows)
        self.log_softmax = log_softmax or LogSoftmaxCache()

    def __call__(self, output: Any) -> torch.Tensor:
        logprobs, offset = self.log_softmax(output)
        if logprobs.shape[0] != self.batch:
            raise ValueError(f"target built for {self.batch} samples got a batch of {logprobs.shape[0]}")
        if self.first_position + offset < 0:
            raise ValueError(f"the logits hold the last {logprobs.shape[1]} positions; a word is scored at "
                             f"position {self.first_position}, before them")
        picked = logprobs[self.owner, self.pos + offset, self.tok]
        return torch.zeros(self.batch, dtype=logprobs.dtype, device=logprobs.device).index_add(
            0, self.owner.to(logprobs.device), picked)


def word_targets(tokens: CaptionTokens | Sequence[CaptionTokens], text_logits_from_end: bool = False,
                 selected: Sequence[Sequence[int]] | None = None, device: torch.device | str = "cpu",
                 ) -> tuple[list[TokensLogProb], TokensLogProb]:
    """Target k scores the k-th selected word of every caption (all words by default), and the
    whole-caption target sums all words; their index tensors live on ``device`` (the model's)."""
    batch = [tokens] if isinstance(tokens, CaptionTokens) else list(tokens)
    cache = LogSoftmaxCache(max(t.input_ids.shape[1] for t in batch) if text_logits_from_end else None)
    chosen = [list(range(len(t.word_positions))) for t in batch] if selected is None else [list(s) for s in selected]
    count = max(len(c) for c in chosen)
    per_word = [TokensLogProb([t.word_positions[c[k]] if k < len(c) else [] for t, c in zip(batch, chosen)], cache,
                              device) for k in range(count)]
    whole = TokensLogProb([[pt for p in t.word_positions for pt in p] for t in batch], cache, device)
    return per_word, whole


def word_readout(targets: Sequence[TokensLogProb], rows: int) -> torch.Tensor:
    """(T, B, rows): target t reads its map from the text positions whose logits score it, equally
    weighted (the attention methods' readout)."""
    device = targets[0].owner.device
    readout = torch.zeros(len(targets), targets[0].batch, rows, device=device)
    for t, target in enumerate(targets):
        readout[t].index_put_((target.owner, target.pos), torch.ones(len(target.pos), device=device), accumulate=True)
    return readout / readout.sum(dim=-1, keepdim=True).clamp(min=1)


@dataclass
class CaptionExplanation:
    """Per-word maps for one image and caption.

    maps (n_words, H, W) and caption_map (H, W) at the ORIGINAL image size; layer_maps
    (n_words, h, w) at the explained layer. A pixel-space method (Guided Grad-CAM) keeps in
    ``maps`` / ``layer_maps`` the CAM maps it refines and its own per-pixel maps in
    ``guided_maps`` (n_words, H, W) and ``method_maps`` (what ``for_method`` and eval read).
    """

    caption: str
    words: list[str]
    word_logprobs: list[float]
    caption_logprob: float
    maps: torch.Tensor
    layer_maps: torch.Tensor
    caption_map: torch.Tensor
    seen: torch.Tensor
    method: str
    layer: str
    model: str
    counterfactual: bool = False
    guided_maps: torch.Tensor | None = None
    # (n_words, C): the first method's own channel weights (Explanation.channel_weights; Grad-CAM:
    # the mean gradient), None for a method that weighs locations (HiResCAM, LayerCAM)
    alphas: torch.Tensor | None = None
    # every method computed in the same pass (``method`` first): name -> (maps, layer_maps, caption_map)
    method_maps: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    notice: str | None = None  # set when the image lies outside what the model knows (default models)

    @property
    def methods(self) -> list[str]:
        return list(self.method_maps) or [self.method]

    def for_method(self, method: str) -> "CaptionExplanation":
        """This explanation with ``method``'s maps (one of ``methods``, computed in the same pass)."""
        name = method_names(method, known=self.methods)[0]
        maps, layer_maps, caption_map = self.method_maps[name]
        return replace(self, maps=maps, layer_maps=layer_maps, caption_map=caption_map, method=name)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.maps.shape[-2]), int(self.maps.shape[-1])

    def normalized(self) -> torch.Tensor:
        return mg.normalize_maps(self.maps)

    def word_map(self, word: int | str) -> torch.Tensor:
        """The (H, W) map of a word given by its index or (first occurrence of) the word itself."""
        if isinstance(word, str):
            lowered = [w.lower() for w in self.words]
            if word.lower() not in lowered:
                raise KeyError(f"word {word!r} is not in the caption {self.caption!r} (words: {', '.join(self.words)})")
            return self.maps[lowered.index(word.lower())]
        if not isinstance(word, int) or not -len(self.words) <= word < len(self.words):
            raise IndexError(f"word index {word!r} is out of range: the caption has {len(self.words)} words "
                             f"(0..{len(self.words) - 1})")
        return self.maps[word]

    def summary(self) -> dict:
        """JSON-ready: caption, words, log-probs and per-word map statistics."""
        words = []
        for j, word in enumerate(self.words):
            m = self.maps[j]
            peak = divmod(int(m.argmax()), m.shape[1])
            words.append({"index": j, "word": word, "logprob": self.word_logprobs[j],
                          "map_max": float(m.max()), "map_mean": float(m.mean()),
                          "peak_yx": [int(peak[0]), int(peak[1])]})
        return {"caption": self.caption, "model": self.model, "method": self.method, "layer": self.layer,
                "counterfactual": self.counterfactual, "image_size": list(self.image_size),
                "caption_logprob": self.caption_logprob, "words": words}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"maps": self.maps.numpy(), "layer_maps": self.layer_maps.numpy(),
               "caption_map": self.caption_map.numpy(), "seen": self.seen.numpy(),
               "words": np.array(self.words), "word_logprobs": np.array(self.word_logprobs)}
        if self.guided_maps is not None:
            out["guided_maps"] = self.guided_maps.numpy()
        for name, (maps, _, _) in self.method_maps.items():
            out[f"maps@{name}"] = maps.numpy()
        return out


class Captioner(Adapter):
    """What every captioning adapter provides; ``explain`` is shared by all model families.

    Subclasses set ``model`` (an nn.Module whose forward takes the keyword inputs from
    ``batch_inputs`` and returns logits (B, L, V) or an output with ``.logits``), ``default_layer``
    (with ``layer_reason``) and ``pad_id``, and implement ``preprocess``, ``tokenize``,
    ``generate_batch`` and ``normalization`` (``batch_inputs`` when the default does not fit).
    """

    pad_id: int = 0
    # the logits end at the sequence's last position: they hold image positions first (GIT) or only
    # the caption's last positions (``logit_window``)
    text_logits_from_end: bool = False
    # the image tokens sit in the text decoder's sequence, so the LM head can be read at them
    # (readout methods such as TAM); a family that sets it implements ``image_token_logits``
    image_tokens_in_text: bool = False

    def logit_window(self, tokens: Sequence[CaptionTokens]) -> dict[str, Any]:
        """Inputs that make the forward compute only the logits the word targets read (none by
        default; a chat VLM keeps the reply's: its LM head's logits and their gradients at the
        hundreds of image and prompt positions are the largest single cost otherwise)."""
        return {}

    def image_token_logits(self, output: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, h*w, V): the LM head's logits at the image tokens of the grid (prefix tokens such as
        CLS dropped), and the grid (h, w)."""
        raise NotImplementedError

    def _readout_explanations(self, names: Sequence[str], model_inputs: dict[str, torch.Tensor],
                              tokens: Sequence[CaptionTokens], chosen: Sequence[Sequence[int]],
                              targets: Sequence[Any]) -> dict[str, Explanation]:
        """Readout methods (TAM) from one forward without gradients, shaped as the engine's
        Explanations: target k of caption b is its k-th chosen word, the last the whole caption
        (the mean of all its words' maps)."""
        if not self.image_tokens_in_text:
            able = sorted({r.family for r in registered_adapters("captioning")
                           if getattr(r.adapter, "image_tokens_in_text", False)})
            raise ValueError(f"method {names[0]!r} reads the LM head at image tokens in the text sequence; the "
                             f"{self.family!r} family has none. Families that support it: {', '.join(able)}")
        with torch.no_grad(), mg.engine.preserved_state(self.model), self.forward_context():
            output = self.model(**model_inputs)
            scores = torch.stack([t(output) for t in targets]).detach().float()  # (T, B)
            logits, (h, w) = self.image_token_logits(output, model_inputs)
        logits = logits.float()
        out = {}
        for name in names:
            layer_maps = logits.new_zeros((len(targets), len(tokens), h, w))
            for b, (t, c) in enumerate(zip(tokens, chosen)):
                # a word's raw map: its tokens' logits at every image token
                raw = torch.stack([sum(logits[b, :, tok] for _, tok in positions) if positions
                                   else logits.new_zeros(h * w) for positions in t.word_positions]).reshape(-1, h, w)
                word_maps = get_method(name).maps(raw)
                layer_maps[:len(c), b] = word_maps[c]
                layer_maps[-1, b] = word_maps.mean(dim=0)
            out[name] = Explanation(layer_maps=layer_maps, signed_layer_maps=layer_maps, activations=logits.new_empty(0),
                                    gradients=None, scores=scores, input_size=self.readout_size(model_inputs),
                                    method=name, layer_name="LM head at the image tokens")
        return out

    def readout_size(self, model_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(H, W) the readout methods' maps are upsampled to: the layer maps' (``layer_options``'
        input_size, for a family whose pixel input is not one image) or the pixel input's."""
        size = self.layer_options.get("input_size")
        return tuple(size) if size is not None else tuple(model_inputs["pixel_values"].shape[-2:])

    def set_prompt(self, prompt: str) -> None:
        """The text the model is asked to caption with (chat VLMs' user turn); a family that reads
        no prompt refuses one."""
        able = sorted({r.family for r in registered_adapters("captioning") if hasattr(r.adapter, "prompt_text")})
        raise ValueError(f"the {self.family!r} family captions without a prompt; prompt= / --prompt applies to "
                         f"chat VLMs ({', '.join(able)})")

    def preprocess(self, image: ImageLike) -> tuple[dict[str, torch.Tensor], Any]:
        raise NotImplementedError

    def tokenize(self, caption: str) -> CaptionTokens:
        raise NotImplementedError

    def batch_inputs(self, pixel_values: torch.Tensor, tokens: Sequence[CaptionTokens]) -> dict[str, torch.Tensor]:
        """The model's keyword inputs for a batch of preprocessed images and their captions."""
        return {"pixel_values": pixel_values, **self.collate(tokens)}

    def prepare(self, image: ImageLike, text: str) -> tuple[dict[str, torch.Tensor], Any]:
        """The model's keyword inputs for one image and its caption, and the image geometry."""
        pixels, geometry = self.preprocess(image)
        return self.batch_inputs(pixels["pixel_values"], [self.tokenize(text)]), geometry

    def generate(self, image: ImageLike, beam_size: int = 1, max_words: int | None = None) -> str:
        """The model's caption of ``image``, at most ``max_words`` words long when given."""
        if max_words is not None and max_words < 1:
            raise ValueError(f"max_words must be at least 1 (or None), got {max_words}")
        return self.generate_batch([image], beam_size=beam_size, max_words=max_words)[0]

    def generate_batch(self, images: Sequence[ImageLike], beam_size: int = 1,
                       max_words: int | None = None) -> list[str]:
        """Captions for several images (at most ``max_words`` words each when given)."""
        raise NotImplementedError

    def generate_from_pixels(self, pixel_values: torch.Tensor, beam_size: int = 1, max_words: int | None = None,
                             geometries: Sequence[Any] | None = None) -> list[str]:
        """``generate_batch`` on pixels already made by ``preprocess`` (concatenated, (B, ...)):
        an evaluation decodes and preprocesses images ahead of the model, in worker processes.
        ``geometries``: each image's geometry from ``preprocess``, for a family whose pixels do not
        say where one image ends (Qwen2-VL packs all images' patches into one sequence)."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate from preprocessed pixels")

    def collate(self, tokens: Sequence[CaptionTokens]) -> dict[str, torch.Tensor]:
        """Batch the text inputs: right-pad ``input_ids`` (with ``pad_id``) and the extra inputs (0)."""
        length = max(t.input_ids.shape[1] for t in tokens)
        device = self.device
        batch = {"input_ids": torch.full((len(tokens), length), self.pad_id, dtype=torch.long, device=device)}
        for row, t in enumerate(tokens):
            batch["input_ids"][row, :t.input_ids.shape[1]] = t.input_ids[0]
            for key, value in t.extra_inputs.items():
                batch.setdefault(key, torch.zeros((len(tokens), length), dtype=value.dtype, device=device)
                                 )[row, :value.shape[1]] = value[0]
        return batch

    def score_batch(self, images: Sequence[ImageLike], captions: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        """Teacher-forced per-word log-probabilities of ``captions[i]`` on ``images[i]`` (no gradients)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(captions)} captions given for {len(images)} images")
        scores: list[list[float]] = []
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            tokens = [self.tokenize(c) for c in captions[chunk]]
            pixels = torch.cat([self.preprocess(load_image(i))[0]["pixel_values"] for i in images[chunk]])
            per_word, _ = word_targets(tokens, self.text_logits_from_end, device=self.device)
            with torch.no_grad(), mg.engine.preserved_state(self.model), self.forward_context():
                output = self.model(**self.to_device(self.batch_inputs(pixels, tokens)), **self.logit_window(tokens))
                values = torch.stack([t(output) for t in per_word]).T  # (B, max words)
            scores += [values[b, :len(t.words)].tolist() for b, t in enumerate(tokens)]
        return scores

    def explain(self, image: ImageLike, caption: str | None = None, method: MethodSpec | None = None,
                layer: nn.Module | str | None = None, counterfactual: bool = False, beam_size: int = 1,
                batched: bool | str = "auto", max_targets_per_backward: int | None = None) -> CaptionExplanation:
        """Explain every word of ``caption`` (generated first when None) on ``image``.

        ``method``: the model's default (``default_method``) when None; several ("gradcam,layercam",
        a list, or "all") are computed from the same forward and backward pass: ``maps`` holds the
        first one's, ``method_maps`` / ``for_method(name)`` every one's. ``notice``: a short note
        when the model does not know images like this one (None otherwise).
        ``max_targets_per_backward``: words per batched backward (None: auto; see ``mg.explain``)."""
        pil = load_image(image)
        result = self.explain_batch([pil], [caption], method=method, layer=layer, counterfactual=counterfactual,
                                    beam_size=beam_size, batched=batched,
                                    max_targets_per_backward=max_targets_per_backward)[0]
        result.notice = self.domain_notice(pil)
        return result

    def explain_batch(self, images: Sequence[ImageLike], captions: Sequence[str | None] | None = None,
                      method: MethodSpec | None = None, layer: nn.Module | str | None = None,
                      counterfactual: bool = False, beam_size: int = 1, batched: bool | str = "auto",
                      select: Any = None, max_targets_per_backward: int | None = None) -> list[CaptionExplanation]:
        """Explain the captions of several images: one forward pass and one batched backward for
        all words of all captions (word j of every caption is one target).

        ``select(words) -> indices`` explains only those words of each caption (the others get
        empty maps and NaN log-probs): an evaluation scores only mappable words, and fewer targets
        make the batched backward cheaper. ``max_targets_per_backward``: targets (word positions)
        per batched backward, None: auto (see ``mg.explain``)."""
        check_max_targets(max_targets_per_backward)  # before generating captions
        pils = [load_image(image, what=f"images[{i}]") for i, image in enumerate(images)]
        captions = list(captions) if captions is not None else [None] * len(pils)
        if len(captions) != len(pils):
            raise ValueError(f"{len(captions)} captions given for {len(pils)} images")
        for i, caption in enumerate(captions):
            if caption is not None and not isinstance(caption, str):
                raise TypeError(f"captions[{i}] must be a str or None, got {type(caption).__name__}")
        missing = [i for i, c in enumerate(captions) if c is None]
        if missing:
            for i, caption in zip(missing, self.generate_batch([pils[i] for i in missing], beam_size=beam_size)):
                if not caption.strip():
                    raise ValueError(f"the model generated an empty caption for image {i}; give one")
                captions[i] = caption
        prepared = [self.preprocess(pil) for pil in pils]
        pixel_values = torch.cat([inputs["pixel_values"] for inputs, _ in prepared])
        return self.explain_pixels(pixel_values, [g for _, g in prepared], captions, method=method, layer=layer,
                                   counterfactual=counterfactual, batched=batched, select=select,
                                   max_targets_per_backward=max_targets_per_backward)

    def explain_pixels(self, pixel_values: torch.Tensor, geometries: Sequence[Any], captions: Sequence[str],
                       method: MethodSpec | None = None, layer: nn.Module | str | None = None,
                       counterfactual: bool = False, batched: bool | str = "auto",
                       select: Any = None, max_targets_per_backward: int | None = None,
                       ) -> list[CaptionExplanation]:
        """``explain_batch`` on pixels already made by ``preprocess`` (row i: ``captions[i]`` on the
        image whose geometry is ``geometries[i]``): one forward and one batched backward for all
        words. An evaluation preprocesses ahead of the model (worker processes) and calls this."""
        if not len(pixel_values) == len(geometries) == len(captions):
            raise ValueError(f"explain_pixels needs one geometry and one caption per image: {len(pixel_values)} "
                             f"images, {len(geometries)} geometries, {len(captions)} captions")
        tokens = [self.tokenize(c) for c in captions]
        return self._explain_tokens(self.batch_inputs(pixel_values, tokens), tokens, list(geometries),
                                    method=method, layer=layer, counterfactual=counterfactual, batched=batched,
                                    select=select, max_targets_per_backward=max_targets_per_backward)

    def explain_prepared(self, inputs: dict[str, torch.Tensor], geometry: Any, text: str,
                         method: MethodSpec | None = None, layer: nn.Module | str | None = None,
                         counterfactual: bool = False, batched: bool | str = "auto",
                         select: Any = None, max_targets_per_backward: int | None = None) -> CaptionExplanation:
        """``explain`` on inputs from ``prepare(image, text)``, whose pixels may have been changed
        (e.g. an adversarial image); ``text`` is the caption they were prepared with."""
        return self._explain_tokens(inputs, [self.tokenize(text)], [geometry], method=method, layer=layer,
                                    counterfactual=counterfactual, batched=batched, select=select,
                                    max_targets_per_backward=max_targets_per_backward)[0]

    def _explain_tokens(self, model_inputs: dict[str, torch.Tensor], tokens: Sequence[CaptionTokens],
                        geometries: Sequence[Any], method: MethodSpec | None = None,
                        layer: nn.Module | str | None = None, counterfactual: bool = False,
                        batched: bool | str = "auto", select: Any = None,
                        max_targets_per_backward: int | None = None) -> list[CaptionExplanation]:
        """The shared core: one forward and one batched backward for all words of all captions."""
        check_max_targets(max_targets_per_backward)
        chosen = [list(range(len(t.words))) if select is None else sorted(set(select(t.words))) for t in tokens]
        for t, c in zip(tokens, chosen):
            if any(not 0 <= j < len(t.words) for j in c):
                raise IndexError(f"select chose word indices {c} for a caption of {len(t.words)} words")
        model_inputs = self.to_device(model_inputs)
        per_word, whole = word_targets(tokens, self.text_logits_from_end, chosen, device=self.device)
        layer = self.resolve_layer(layer)
        names = self.method_choice(self.default_method if method is None else method)
        readout = [name for name in names if is_readout_method(name)]  # read by the task, not the engine
        exps = self._readout_explanations(readout, model_inputs, tokens, chosen, per_word + [whole]) if readout else {}
        engine_names = [name for name in names if name not in exps]
        if engine_names:
            attention = {}
            if any(is_attention_method(n) for n in engine_names):
                attention = {"attention": self.attention_graph(model_inputs),
                             "readout": word_readout(per_word + [whole],
                                                     model_inputs[getattr(self, "input_key", "input_ids")].shape[1])}
            with self.forward_context():
                exps.update(mg.explain(self.model, {**model_inputs, **self.logit_window(tokens)}, per_word + [whole],
                                       layer, engine_names,
                                       counterfactual=counterfactual, batched=batched, image_key="pixel_values",
                                       max_targets_per_backward=max_targets_per_backward,
                                       **self.layer_options, **attention))
        exps = {name: exp.results_on("cpu") for name, exp in exps.items()}  # results: CPU, float32
        first = exps[names[0]]
        pixel = next((exps[n] for n in names if exps[n].pixel_maps is not None), None)
        results = []
        for b, (geometry, t, c) in enumerate(zip(geometries, tokens, chosen)):
            n, k = len(t.words), len(c)
            # word j's rows: the k selected words are the first k targets; the rest stay empty
            order = torch.tensor(c, dtype=torch.long, device="cpu")

            def per_word_rows(rows: torch.Tensor) -> torch.Tensor:
                out = rows.new_zeros((n, *rows.shape[1:]))
                out[order] = rows[:k]
                return out

            method_maps = {}
            for name in names:
                exp = exps[name]  # a pixel-space method's own maps are its pixel maps
                image_maps = geometry.invert((exp.maps if exp.pixel_maps is None else exp.pixel_maps)[:, b])
                method_maps[name] = (per_word_rows(image_maps), per_word_rows(exp.layer_maps[:, b]),
                                     image_maps[-1])
            scores = first.scores[:, b]
            logprobs = torch.full((n,), float("nan"), device="cpu")
            logprobs[order] = scores[:k].float()
            # ``maps`` are the first method's CAM maps (for a pixel-space method, those it refines)
            if first.pixel_maps is None:
                word_maps, layer_maps, caption_map = method_maps[names[0]]
            else:
                image_maps = geometry.invert(first.maps[:, b])
                word_maps, layer_maps, caption_map = per_word_rows(image_maps), method_maps[names[0]][1], image_maps[-1]
            weights = first.channel_weights
            results.append(CaptionExplanation(
                caption=join_caption(t), words=t.words, word_logprobs=logprobs.tolist(),
                caption_logprob=float(scores[-1]), maps=word_maps, layer_maps=layer_maps,
                caption_map=caption_map, seen=geometry.seen(),
                method=first.method, layer=first.layer_name, model=self.name, counterfactual=counterfactual,
                guided_maps=None if pixel is None else method_maps[pixel.method][0],
                alphas=None if weights is None else per_word_rows(weights[:, b]), method_maps=method_maps,
            ))
        return results


def load(name: str | Path | nn.Module = "default", processor: Any = None, *, tokenizer: Any = None,
         image_processor: Any = None, trust_remote_code: bool = False, device: DeviceSpec = "auto",
         dtype: DtypeSpec = None, prompt: str | None = None) -> Captioner:
    """A captioner: "default" (shipped), a directory holding a default-family model, a Hugging Face
    model id or save_pretrained directory, or a transformers model object with its processor (any
    family registered for captioning; README lists them). ``trust_remote_code`` stays off unless
    you turn it on.

    device: "auto" (CUDA, else Apple MPS, else the CPU), "cpu", "cuda", "cuda:1", "mps"; a model
    object stays on its device unless one is named. dtype: None / "float32", "bfloat16" or
    "float16": the forwards run under autocast in that precision (the weights are not cast); maps
    and scores come back on the CPU in float32. prompt: the user turn's text a chat VLM (LLaVA) is
    asked to caption with (None: the family's own, "Describe the image." by default)."""
    captioner = load_adapter("captioning", name, processor, tokenizer=tokenizer, image_processor=image_processor,
                             trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    if prompt is not None:
        captioner.set_prompt(prompt)
    return captioner
