"""The default model family: a small ResNet trunk that keeps a 16x16 grid, with a transformer
caption decoder or a question-attention VQA head. Trained on the shapes world by scripts/."""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from mmgradcam.engine.attention import AttentionGraph, AttentionLayer, mha_pre_hook, mha_probabilities

from . import checkpoints
from .captioning import Captioner, CaptionTokens
from .common import Adapter, LoadRequest, register_loader
from .geometry import ImageLike, Letterbox, load_image, to_tensor
from .shapes_world import domain_notice
from .vqa import ClassifierVQA
from .text import Vocabulary, is_word, join_words, split_words


# The first shipped trunk (configs without an "encoder" entry): patchify stem, one block per stage.
LEGACY_ENCODER = {"stem": 4, "stem_width": 32, "stages": [[48, 1, 1], [128, 1, 2]]}


class ShapesEncoder(nn.Module):
    """A small ResNet trunk of torchvision BasicBlocks that keeps a stride-8 grid.

    A "patchifying" stem (a ``stem``x``stem`` convolution of that stride) is followed by stages
    ``layer1``, ``layer2``, ...; each stage is ``[width, blocks, stride]``. A 128 px image gives a
    16x16 grid at the last stage.
    The depth sets the receptive field of a grid cell, which decides whether the cells can hold
    object-level features (a whole shape in view) without becoming a summary of the whole image
    (see README, "The shapes world and the default models").
    """

    def __init__(self, spec: dict | None = None):
        super().__init__()
        spec = dict(LEGACY_ENCODER if spec is None else spec)
        stem, stem_width = int(spec["stem"]), int(spec["stem_width"])
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, stem, stride=stem, bias=False),
                                  nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        self.stage_names: list[str] = []
        inplanes = stem_width
        for index, stage in enumerate(spec["stages"], start=1):
            width, count, stride = (int(v) for v in stage)
            setattr(self, f"layer{index}", self._stage(inplanes, width, count, stride))
            self.stage_names.append(f"layer{index}")
            inplanes = width
        self.out_channels = inplanes

    @staticmethod
    def _stage(inplanes: int, planes: int, count: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(inplanes, planes, stride, downsample)]
        layers += [BasicBlock(planes, planes) for _ in range(count - 1)]
        return nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x


class GridTokens(nn.Module):
    """(B, C, h, w) feature map -> (B, h*w, d) tokens with a learned 2-D position embedding.

    Deliberately no per-token LayerNorm here: it would make the decoder blind to each cell's
    feature scale, so gradient x activation sums to ~0 at every cell and CAM maps degenerate
    (the maps of our first models pointed to the named shape 12-16% of the time because of it).
    """

    def __init__(self, channels: int, dim: int, grid: int):
        super().__init__()
        self.project = nn.Linear(channels, dim)
        self.row = nn.Parameter(torch.randn(grid, dim) * 0.02)
        self.col = nn.Parameter(torch.randn(grid, dim) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        tokens = self.project(features.flatten(2).transpose(1, 2))
        position = (self.row[:h, None, :] + self.col[None, :w, :]).reshape(h * w, -1)
        return tokens + position


# ----------------------------------------------------------------------------- cached decoding
# Incremental decoding for CaptionNet's nn.TransformerDecoder, written with each layer's own
# weights. It is exact only for the layer form it re-implements, so anything else is refused.
_POINTWISE_ACTIVATIONS = (F.relu, F.gelu)


def cache_unsupported(decoder: nn.Module) -> str | None:
    """Why the cached path cannot reproduce ``decoder`` (None: it can)."""
    if type(decoder) is not nn.TransformerDecoder:
        return f"the decoder is a {type(decoder).__name__}, not an nn.TransformerDecoder"
    for i, layer in enumerate(decoder.layers):
        where = f"decoder.layers[{i}]"
        # a subclass may change forward; only torch's own layer is known
        if type(layer) is not nn.TransformerDecoderLayer:
            return f"{where} is a {type(layer).__name__}, not an nn.TransformerDecoderLayer"
        if not layer.norm_first:
            return f"{where} has norm_first=False (the cache implements pre-norm layers only)"
        # the feed-forward block must act on each position alone for a one-token step to be exact
        activation = layer.activation
        if not (activation in _POINTWISE_ACTIVATIONS or type(activation) in (nn.ReLU, nn.GELU)):
            return f"{where} has activation {activation!r}; the cache implements relu and gelu"
        for name in ("self_attn", "multihead_attn"):
            attn = getattr(layer, name)
            if not attn.batch_first:
                return f"{where}.{name} has batch_first=False"
            if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
                return f"{where}.{name} has separate q/k/v projection weights"
            if attn.bias_k is not None or attn.add_zero_attn:
                return f"{where}.{name} has bias_k/bias_v or add_zero_attn"
    return None


@dataclass
class DecoderCache:
    """Per-layer keys and values: self-attention ones (B, heads, max_tokens, head_dim), filled one
    position per step, and the memory's cross-attention ones (B, heads, N, head_dim), computed once."""

    self_keys: list[torch.Tensor] = field(default_factory=list)
    self_values: list[torch.Tensor] = field(default_factory=list)
    cross_keys: list[torch.Tensor] = field(default_factory=list)
    cross_values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # positions already decoded


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, heads, L, D / heads)."""
    b, length, d = x.shape
    return x.view(b, length, heads, d // heads).transpose(1, 2)


def _bias_rows(attn: nn.MultiheadAttention, start: int, stop: int | None) -> torch.Tensor | None:
    """Rows [start:stop] of the packed q/k/v projection bias (None for bias=False)."""
    return None if attn.in_proj_bias is None else attn.in_proj_bias[start:stop]


def _attend(attn: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of (B, heads, 1, hd) queries, then the output projection."""
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    b, heads, length, hd = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, length, heads * hd))


def start_decoder_cache(decoder: nn.TransformerDecoder, memory: torch.Tensor, max_tokens: int) -> DecoderCache:
    """An empty cache for ``memory`` (B, N, D): refuses (NotImplementedError) a decoder it cannot reproduce."""
    reason = cache_unsupported(decoder)
    if reason is not None:
        raise NotImplementedError(f"cached decoding does not support this decoder: {reason}")
    cache = DecoderCache()
    b, _, d = memory.shape
    for layer in decoder.layers:
        heads = layer.self_attn.num_heads
        empty = memory.new_zeros(b, heads, max_tokens, d // heads)
        cache.self_keys.append(empty)
        cache.self_values.append(empty.clone())
        cross = layer.multihead_attn
        k, v = F.linear(memory, cross.in_proj_weight[d:], _bias_rows(cross, d, None)).chunk(2, dim=-1)
        cache.cross_keys.append(_heads(k, cross.num_heads))
        cache.cross_values.append(_heads(v, cross.num_heads))
    return cache


def decoder_step(decoder: nn.TransformerDecoder, cache: DecoderCache, x: torch.Tensor) -> torch.Tensor:
    """The decoder's output (B, 1, D) for the next position's input ``x`` (B, 1, D), given the
    cached earlier positions; the same arithmetic as torch's norm_first layer, one position at a time."""
    t = cache.length
    if t >= cache.self_keys[0].shape[2]:
        raise ValueError(f"the cache holds {cache.self_keys[0].shape[2]} positions; all are used")
    d = x.shape[-1]
    for i, layer in enumerate(decoder.layers):
        sa = layer.self_attn
        q, k, v = F.linear(layer.norm1(x), sa.in_proj_weight, sa.in_proj_bias).chunk(3, dim=-1)
        cache.self_keys[i][:, :, t:t + 1] = _heads(k, sa.num_heads)
        cache.self_values[i][:, :, t:t + 1] = _heads(v, sa.num_heads)
        # the causal mask is implicit: the cache holds only positions up to t
        x = x + layer.dropout1(_attend(sa, _heads(q, sa.num_heads), cache.self_keys[i][:, :, :t + 1],
                                       cache.self_values[i][:, :, :t + 1]))
        ca = layer.multihead_attn
        q = F.linear(layer.norm2(x), ca.in_proj_weight[:d], _bias_rows(ca, 0, d))
        x = x + layer.dropout2(_attend(ca, _heads(q, ca.num_heads), cache.cross_keys[i], cache.cross_values[i]))
        x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))))
    cache.length = t + 1
    return x if decoder.norm is None else decoder.norm(x)


class CaptionNet(nn.Module):
    """Encoder + transformer decoder: ``forward(pixel_values, input_ids) -> logits (B, L, V)``."""

    def __init__(self, vocab_size: int, dim: int = 128, layers: int = 2, heads: int = 4, max_tokens: int = 24,
                 grid: int = 16, dropout: float = 0.1, encoder: dict | None = None):
        super().__init__()
        self.encoder = ShapesEncoder(encoder)
        self.grid_tokens = GridTokens(self.encoder.out_channels, dim, grid)
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.max_tokens = max_tokens

    def memory(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.grid_tokens(self.encoder(pixel_values))

    def decode(self, memory: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_tokens:
            raise ValueError(f"{length} tokens exceed the model's limit of {self.max_tokens}")
        x = self.embed(input_ids) * math.sqrt(self.embed.embedding_dim) + self.position[:length]
        causal = torch.triu(torch.full((length, length), float("-inf"), device=x.device), diagonal=1)
        x = self.decoder(x, memory, tgt_mask=causal)
        return self.head(self.norm(x))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(self.memory(pixel_values), input_ids)

    def start_cache(self, memory: torch.Tensor) -> DecoderCache:
        """An empty key/value cache for generating from ``memory`` (B, N, D)."""
        return start_decoder_cache(self.decoder, memory, self.max_tokens)

    def decode_step(self, cache: DecoderCache, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after the token ids (B,) at the cache's next position; with the earlier
        positions cached this equals ``decode(memory, prefix)[:, -1]``."""
        t = cache.length
        if t >= self.max_tokens:
            raise ValueError(f"position {t} exceeds the model's limit of {self.max_tokens} tokens")
        x = self.embed(input_ids.reshape(-1, 1)) * math.sqrt(self.embed.embedding_dim) + self.position[t]
        return self.head(self.norm(decoder_step(self.decoder, cache, x)))[:, 0]

    @torch.no_grad()
    def greedy(self, pixel_values: torch.Tensor, bos_id: int, eos_id: int, max_len: int | None = None,
               use_cache: bool = True) -> torch.Tensor:
        """(B, <=max_len) generated ids after BOS, stopping when every sample has produced EOS.

        ``use_cache``: decode one position per step with cached keys/values (O(L) work per step
        instead of re-running the prefix); a decoder the cache cannot reproduce warns and runs uncached."""
        max_len = min(max_len or self.max_tokens - 1, self.max_tokens - 1)
        memory = self.memory(pixel_values)
        cache = None
        if use_cache:
            try:
                cache = self.start_cache(memory)
            except NotImplementedError as error:
                warnings.warn(f"{error}; generating without the cache", stacklevel=2)
        ids = torch.full((pixel_values.shape[0], 1), bos_id, dtype=torch.long, device=pixel_values.device)
        done = torch.zeros(pixel_values.shape[0], dtype=torch.bool, device=pixel_values.device)
        for _ in range(max_len):
            logits = self.decode_step(cache, ids[:, -1]) if cache is not None else self.decode(memory, ids)[:, -1]
            next_id = logits.argmax(-1)
            next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            done |= next_id == eos_id
            if bool(done.all()):
                break
        return ids[:, 1:]

    @torch.no_grad()
    def beam(self, pixel_values: torch.Tensor, bos_id: int, eos_id: int, beam_size: int,
             max_len: int | None = None) -> list[int]:
        """Beam search for one image; returns the best sequence's ids (without BOS, up to EOS)."""
        max_len = min(max_len or self.max_tokens - 1, self.max_tokens - 1)
        memory = self.memory(pixel_values[:1])
        beams = [([bos_id], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_len):
            ids = torch.tensor([b[0] for b in beams], device=pixel_values.device)
            logprobs = torch.log_softmax(self.decode(memory.expand(len(beams), -1, -1), ids)[:, -1], -1)
            candidates = []
            for (seq, score), row in zip(beams, logprobs):
                values, indices = row.topk(beam_size)
                candidates += [(seq + [int(i)], score + float(v)) for v, i in zip(values, indices)]
            candidates.sort(key=lambda c: c[1], reverse=True)
            beams = []
            for seq, score in candidates:
                (finished if seq[-1] == eos_id else beams).append((seq, score))
                if len(beams) == beam_size:
                    break
            if not beams or len(finished) >= beam_size:
                break
        pool = finished or beams
        best = max(pool, key=lambda c: c[1] / len(c[0]))  # length-normalized
        return best[0][1:]


def build_caption_model(config: dict) -> CaptionNet:
    return CaptionNet(len(config["vocabulary"]), dim=config["dim"], layers=config["layers"],
                      heads=config["heads"], max_tokens=config["max_tokens"], grid=config["grid"],
                      encoder=config.get("encoder"))


class DefaultFamily:
    """What the default captioner and VQA adapters share: the model in eval mode, its config and
    vocabulary, and letterboxed preprocessing to the model's square input."""

    def __init__(self, model: nn.Module, config: dict):
        self.model = model.eval()
        self.config = config
        self.vocab = Vocabulary(config["vocabulary"])
        self.image_size = int(config["image_size"])
        # defaults measured on the val split (scripts/sweep_localization.py) travel with the weights
        self.default_layer = config.get("default_layer", self.default_layer)
        self.default_method = config.get("default_method", self.default_method)
        self.layer_reason = config.get("default_reason", self.layer_reason)

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel (mean, std) mapping [0, 1] pixels to the model's input values."""
        return [0.5] * 3, [0.25] * 3  # geometry.to_tensor

    def _decoder(self) -> nn.TransformerDecoder | None:
        """The transformer decoder whose layers cross-attend to the grid tokens (None: FiLM)."""
        decoder = getattr(self.model, "decoder", None) or getattr(self.model, "fusion", None)
        return decoder if isinstance(decoder, nn.TransformerDecoder) else None

    def _readout_attention(self) -> nn.MultiheadAttention | None:
        """FiLM VQA's attention readout (a question query over the regions), if it has one."""
        return getattr(self.model, "readout_attention", None)

    def has_attention(self) -> bool:
        return self._decoder() is not None or self._readout_attention() is not None

    def attention_graph(self, inputs: Mapping[str, torch.Tensor]) -> AttentionGraph | None:
        """Every decoder layer's self-attention then its cross-attention to the grid tokens (or FiLM
        VQA's one readout attention from the question query to the regions); torch's layers call
        their attention with need_weights=False, so a pre-hook asks for the per-head probabilities
        during the call (the hooks go when it ends)."""
        decoder, readout = self._decoder(), self._readout_attention()
        if decoder is None and readout is None:
            return None
        layers = []
        if decoder is not None:
            for block in decoder.layers:
                layers.append(AttentionLayer(block.self_attn, "self", mha_probabilities, mha_pre_hook))
                layers.append(AttentionLayer(block.multihead_attn, "cross", mha_probabilities, mha_pre_hook))
        else:
            layers.append(AttentionLayer(readout, "cross", mha_probabilities, mha_pre_hook))
        # the grid is the encoder's output size for these pixels (stride from the model, not assumed)
        with torch.no_grad():
            probe = torch.zeros(1, *inputs["pixel_values"].shape[1:], device=inputs["pixel_values"].device,
                                dtype=inputs["pixel_values"].dtype)
            grid = tuple(int(n) for n in self.model.encoder(probe).shape[-2:])
        return AttentionGraph(layers, grid, slice(0, grid[0] * grid[1]))

    def letterbox(self, image: ImageLike) -> tuple[torch.Tensor, Letterbox]:
        """(1, 3, S, S) pixels and the geometry that maps the result back to the original image."""
        pil = load_image(image)
        geometry = Letterbox((pil.height, pil.width), self.image_size)
        return to_tensor(geometry.apply(pil)), geometry


class DefaultCaptioner(DefaultFamily, Captioner):
    """The shipped shapes-world captioner (or one trained by scripts/train_captioner.py)."""

    family = "default"
    default_layer = "encoder.layer2"
    layer_reason = "the trunk's last stage: a 16x16 grid the decoder cross-attends to"

    def __init__(self, model: CaptionNet, config: dict):
        super().__init__(model, config)
        self.max_tokens = model.max_tokens

    def preprocess(self, image: ImageLike) -> tuple[dict[str, torch.Tensor], Letterbox]:
        pixel_values, geometry = self.letterbox(image)
        return {"pixel_values": pixel_values}, geometry

    def tokenize(self, caption: str) -> CaptionTokens:
        tokens = split_words(caption)
        if not any(is_word(t) for t in tokens):
            raise ValueError(f"caption {caption!r} is empty: it has no words to explain")
        ids = self.vocab.encode(tokens, what=f"caption {caption!r}")
        if len(ids) + 1 > self.max_tokens:
            raise ValueError(f"caption has {len(ids)} words and marks; the model's limit is {self.max_tokens - 1}")
        input_ids = torch.tensor([[self.vocab.bos_id] + ids], device=self.device)
        # the logit at position i predicts input token i + 1
        words = [(t, [(i, ids[i])]) for i, t in enumerate(tokens) if is_word(t)]
        return CaptionTokens(input_ids=input_ids, words=[w for w, _ in words],
                             word_positions=[p for _, p in words], extra_inputs={}, text=caption)

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id

    def generate_batch(self, images: Sequence[ImageLike], beam_size: int = 1,
                       max_words: int | None = None) -> list[str]:
        pixels = torch.cat([self.preprocess(image)[0]["pixel_values"] for image in images])
        return self.generate_from_pixels(pixels, beam_size, max_words)

    def generate_from_pixels(self, pixel_values: torch.Tensor, beam_size: int = 1, max_words: int | None = None,
                             geometries: Sequence[Any] | None = None) -> list[str]:
        pixel_values = self.to_device(pixel_values)
        with torch.no_grad(), self.forward_context():
            if beam_size > 1:
                return [join_words(self.vocab.decode(self.model.beam(p[None], self.vocab.bos_id, self.vocab.eos_id,
                                                                     beam_size, max_words))) for p in pixel_values]
            ids = self.model.greedy(pixel_values, self.vocab.bos_id, self.vocab.eos_id, max_words)
        return [join_words(self.vocab.decode(row)) for row in ids]


def is_default_directory(path: str | Path) -> bool:
    """True for a directory holding a default-family model."""
    config = Path(path) / checkpoints.CONFIG
    if not config.is_file():
        return False
    try:
        return checkpoints.read_config(path).get("family") == "default"
    except ValueError:
        return False


# ----------------------------------------------------------------------------- VQA
class AnswerNet(nn.Module):
    """Encoder + question tokens that self-attend and attend over the 16x16 image regions
    (transformer decoder layers without a causal mask) + an answer classifier read from a learned
    answer token. ``forward(pixel_values, input_ids, attention_mask=None) -> logits (B, A)``."""

    def __init__(self, vocab_size: int, num_answers: int, dim: int = 128, layers: int = 2, heads: int = 4,
                 max_question: int = 16, grid: int = 16, dropout: float = 0.1):
        super().__init__()
        self.encoder = ShapesEncoder()
        self.grid_tokens = GridTokens(self.encoder.out_channels, dim, grid)
        self.embed = nn.Embedding(vocab_size, dim)
        self.answer_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(max_question + 1, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.fusion = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_answers))
        self.max_question = max_question

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.answer_features(self.encoder(pixel_values), input_ids, attention_mask)

    def answer_features(self, features: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Answer logits from encoder features (B, C, h, w) (training with a frozen encoder uses this)."""
        length = input_ids.shape[1]
        if length > self.max_question:
            raise ValueError(f"{length} question tokens exceed the model's limit of {self.max_question}")
        memory = self.grid_tokens(features)
        words = self.embed(input_ids) * math.sqrt(self.embed.embedding_dim)
        x = torch.cat([self.answer_token.expand(len(input_ids), -1, -1), words], dim=1) + self.position[:length + 1]
        padding = None
        if attention_mask is not None:
            keep = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], dim=1)
            padding = keep == 0
        x = self.fusion(x, memory, tgt_key_padding_mask=padding)
        return self.classifier(self.norm(x[:, 0]))


class FiLMBlock(nn.Module):
    """A residual block whose convolution is modulated by the question (FiLM, Perez et al. 2018):
    relu(x + relu(gamma * norm(conv(x)) + beta)). Dilation widens the view so that relations
    between objects far apart ("left of the red circle") reach one cell."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm = nn.BatchNorm2d(dim, affine=False)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x)) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return torch.relu(x + torch.relu(y))


class FiLMAnswerNet(nn.Module):
    """Encoder + question-conditioned per-region features + a classifier on pooled regions.

    The question (a GRU over its words) sets the scale and shift of every channel of a stack of
    residual convolutions over the 16x16 grid (with coordinate channels, for relations). The
    answer is read from the result either max- and mean-pooled (``readout="pool"``), so that the
    gradient of an answer reaches the image through the features of the regions that carry it, or
    (``readout="attention"``) through a question query attending over the regions beside the mean
    (an attention readout that attention-gradcam and relevance can explain).
    ``forward(pixel_values, input_ids, attention_mask=None) -> logits (B, A)``.
    """

    def __init__(self, vocab_size: int, num_answers: int, dim: int = 128, dilations: Sequence[int] = (1, 2, 4, 8),
                 max_question: int = 16, encoder: dict | None = None, readout: str = "pool", heads: int = 4):
        super().__init__()
        self.encoder = ShapesEncoder(encoder)
        self.embed = nn.Embedding(vocab_size, dim)
        self.question = nn.GRU(dim, dim, batch_first=True)
        self.project = nn.Sequential(nn.Conv2d(self.encoder.out_channels + 2, dim, 1, bias=False),
                                     nn.BatchNorm2d(dim), nn.ReLU())
        self.fusion = nn.ModuleList(FiLMBlock(dim, d) for d in dilations)
        self.film = nn.Linear(dim, 2 * dim * len(self.fusion))
        if readout not in ("pool", "attention"):
            raise ValueError(f"readout must be 'pool' or 'attention', got {readout!r}")
        self.readout = readout
        if readout == "attention":
            self.query = nn.Linear(dim, dim)
            self.readout_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.classifier = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, num_answers))
        self.max_question = max_question

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.answer_features(self.encoder(pixel_values), input_ids, attention_mask)

    def encode_question(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids.shape[1] > self.max_question:
            raise ValueError(f"{input_ids.shape[1]} question tokens exceed the model's limit of {self.max_question}")
        states, _ = self.question(self.embed(input_ids))
        lengths = (attention_mask.sum(1) if attention_mask is not None
                   else torch.full((len(input_ids),), input_ids.shape[1], device=input_ids.device))
        return states[torch.arange(len(input_ids), device=input_ids.device), lengths.long().clamp(min=1) - 1]

    def answer_features(self, features: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Answer logits from encoder features (B, C, h, w) (training with a frozen encoder uses this)."""
        b, _, h, w = features.shape
        ys = torch.linspace(-1, 1, h, device=features.device, dtype=features.dtype)
        xs = torch.linspace(-1, 1, w, device=features.device, dtype=features.dtype)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, -1, -1, -1)
        x = self.project(torch.cat([features, coords], dim=1))
        question = self.encode_question(input_ids, attention_mask)
        film = self.film(question).view(b, len(self.fusion), 2, -1)
        for k, block in enumerate(self.fusion):
            x = block(x, film[:, k, 0], film[:, k, 1])
        if self.readout == "pool":
            return self.classifier(torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1))
        regions = x.flatten(2).transpose(1, 2)  # (B, h*w, dim), row-major like the grid
        attended, _ = self.readout_attention(self.query(question)[:, None], regions, regions, need_weights=False)
        return self.classifier(torch.cat([attended[:, 0], x.mean(dim=(2, 3))], dim=1))


def build_vqa_model(config: dict) -> AnswerNet | FiLMAnswerNet:
    if config.get("fusion") == "film":
        return FiLMAnswerNet(len(config["vocabulary"]), len(config["answers"]), dim=config["dim"],
                             dilations=config["dilations"], max_question=config["max_question"],
                             encoder=config.get("encoder"), readout=config.get("readout", "pool"),
                             heads=config.get("heads", 4))
    return AnswerNet(len(config["vocabulary"]), len(config["answers"]), dim=config["dim"], layers=config["layers"],
                     heads=config["heads"], max_question=config["max_question"], grid=config["grid"])


class DefaultVQA(DefaultFamily, ClassifierVQA):
    """The shipped shapes-world VQA model (or one trained by scripts/train_vqa.py)."""

    family = "default"
    default_layer = "encoder.layer2"
    layer_reason = "the trunk's last stage: the 16x16 regions the question tokens attend over"

    def __init__(self, model: AnswerNet, config: dict):
        super().__init__(model, config)
        self.set_answers(config["answers"])

    def encode_question(self, question: str) -> torch.Tensor:
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        tokens = split_words(question)
        words = [t for t in tokens if is_word(t)]
        if not words:
            raise ValueError(f"question {question!r} is empty: it has no words")
        unknown = [w for w in words if w not in self.vocab]
        if len(unknown) == len(words):
            raise ValueError(f"question {question!r} has only words the model does not know: "
                             f"{', '.join(dict.fromkeys(unknown))}")
        ids = self.vocab.encode(tokens, what=f"question {question!r}", unknown="warn")
        if len(ids) > self.model.max_question:
            raise ValueError(f"question has {len(ids)} words and marks; the model's limit is {self.model.max_question}")
        return torch.tensor([ids], device=self.device)

    def prepare(self, image: ImageLike, text: str) -> tuple[dict[str, torch.Tensor], Letterbox]:
        input_ids = self.encode_question(text)
        pixel_values, geometry = self.letterbox(image)
        return {"pixel_values": pixel_values, "input_ids": input_ids}, geometry

    def answer_key(self, answer: str) -> str:
        return answer.strip().lower()

    def answer_rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The classifier reads the answer token, row 0 before the question's words (FiLM's
        attention readout has one row: the question query)."""
        if self._readout_attention() is not None:
            return torch.ones(1, device=inputs["input_ids"].device)
        rows = torch.zeros(inputs["input_ids"].shape[1] + 1, device=inputs["input_ids"].device)
        rows[0] = 1.0
        return rows


def load_default(task: str, name: str | Path = "default") -> DefaultCaptioner | DefaultVQA:
    """A default-family captioner (task "captioning") or VQA model ("vqa"): the shipped one for
    "default", else the model directory ``name``."""
    shipped, adapter, build, script = {
        "captioning": ("captioner", DefaultCaptioner, build_caption_model, "train_captioner.py"),
        "vqa": ("vqa", DefaultVQA, build_vqa_model, "train_vqa.py"),
    }[task]
    directory = checkpoints.packaged(shipped) if str(name) == "default" else Path(name)
    if str(name) == "default" and not (directory / checkpoints.WEIGHTS).is_file():
        raise FileNotFoundError(f"the shipped default {task} model is missing from the package "
                                f"(tasks/weights/{shipped}); reinstall, or train one with scripts/{script}")
    config = checkpoints.read_config(directory)
    if config.get("task") != task or config.get("family") != "default":
        raise ValueError(f"{directory}: config is for task={config.get('task')!r} family="
                         f"{config.get('family')!r}, not a default {task} model")
    return adapter(checkpoints.load_weights(build(config), directory), config)


@register_loader("default")
def load_default_family(request: LoadRequest) -> Adapter | None:
    """The registry's loader for "default" and directories holding a default-family model."""
    name = request.source
    if not isinstance(name, (str, Path)) or not (str(name) == "default" or is_default_directory(name)):
        return None
    adapter = load_default(request.task, name)
    adapter.name = str(name)
    # the default models know only the shapes world: say so when an image is not from it
    adapter.domain_check = partial(domain_notice, task=request.task)
    return adapter
