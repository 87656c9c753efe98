"""VQA: maps for an answer (why), for its negation (why not), and for answer A against B.

``load(name)`` gives a VQA model with ``.answer(image, question, top_k)`` and
``.explain(image, question, answer=None)``. The target is the answer's pre-softmax score (as in
the original Grad-CAM VQA code) or, with ``score="logprob"``, its log-probability; generative
answerers use the sum of the answer tokens' log-probabilities. Several answers are explained from
one forward pass and one batched backward. Maps come back at the original image size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mmgradcam as mg
from mmgradcam.engine import preserved_state
from mmgradcam.engine.device import DeviceSpec, DtypeSpec
from mmgradcam.engine.gradients import check_max_targets
from mmgradcam.engine.registry import MethodSpec, is_attention_method, is_readout_method, method_names
from mmgradcam.targets import ClassLogProb, ClassScore, logits_of

from .common import Adapter, load_adapter, registered_adapters
from .geometry import ImageLike, load_image

SCORES = ("logit", "logprob")


class Difference:
    """Target: first(output) - second(output), for the contrast map of answer A against B."""

    def __init__(self, first: Any, second: Any):
        self.first, self.second = first, second

    def __call__(self, output: Any) -> torch.Tensor:
        return self.first(output) - self.second(output)


@dataclass
class VQAExplanation:
    """Maps for the explained answers (the first one is ``answer``), at the ORIGINAL image size.

    A pixel-space method (Guided Grad-CAM) keeps in ``maps`` / ``layer_maps`` the CAM maps it
    refines and its own per-pixel maps in ``guided_maps`` (K, H, W) and ``method_maps`` (what
    ``for_method`` and eval read)."""

    question: str
    answers: list[str]
    scores: list[float]
    probabilities: list[float]
    maps: torch.Tensor  # (K, H, W)
    layer_maps: torch.Tensor  # (K, h, w)
    seen: torch.Tensor
    method: str
    layer: str
    model: str
    score_kind: str
    counterfactual: bool = False
    contrast: str | None = None
    contrast_map: torch.Tensor | None = None  # (H, W): answers[0] against ``contrast``
    top_answers: list[tuple[str, float]] | None = None
    # (K, C): the first method's own channel weights (Explanation.channel_weights; Grad-CAM: the
    # mean gradient), None for a method that weighs locations (HiResCAM, LayerCAM)
    alphas: torch.Tensor | None = None
    # every method computed in the same pass (``method`` first): name -> (maps, layer_maps, contrast_map)
    method_maps: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    notice: str | None = None  # set when the image lies outside what the model knows (default models)
    guided_maps: torch.Tensor | None = None  # (K, H, W): Guided Grad-CAM's per-pixel maps when asked for

    @property
    def methods(self) -> list[str]:
        return list(self.method_maps) or [self.method]

    def for_method(self, method: str) -> "VQAExplanation":
        """This explanation with ``method``'s maps (one of ``methods``, computed in the same pass)."""
        name = method_names(method, known=self.methods)[0]
        maps, layer_maps, contrast_map = self.method_maps[name]
        return replace(self, maps=maps, layer_maps=layer_maps, contrast_map=contrast_map, method=name)

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def score(self) -> float:
        return self.scores[0]

    @property
    def map(self) -> torch.Tensor:
        return self.maps[0]

    def summary(self) -> dict:
        entries = []
        for k, answer in enumerate(self.answers):
            m = self.maps[k]
            peak = divmod(int(m.argmax()), m.shape[1])
            entries.append({"answer": answer, "score": self.scores[k], "probability": self.probabilities[k],
                            "map_max": float(m.max()), "map_mean": float(m.mean()), "peak_yx": list(peak)})
        return {"question": self.question, "model": self.model, "method": self.method, "layer": self.layer,
                "score": self.score_kind, "counterfactual": self.counterfactual, "contrast": self.contrast,
                "image_size": [int(self.maps.shape[-2]), int(self.maps.shape[-1])], "explained": entries,
                "top_answers": [{"answer": a, "probability": p} for a, p in (self.top_answers or [])]}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"maps": self.maps.numpy(), "layer_maps": self.layer_maps.numpy(), "seen": self.seen.numpy(),
               "answers": np.array(self.answers), "scores": np.array(self.scores)}
        if self.contrast_map is not None:
            out["contrast_map"] = self.contrast_map.numpy()
        if self.guided_maps is not None:
            out["guided_maps"] = self.guided_maps.numpy()
        for name, (maps, _, _) in self.method_maps.items():
            out[f"maps@{name}"] = maps.numpy()
        return out


class VQAModel(Adapter):
    """What every VQA adapter provides; ``answer`` and ``explain`` are shared by all families.

    Subclasses set ``model``, ``default_layer`` (+ ``layer_reason``) and implement
    ``prepare(image, question) -> (inputs, geometry)``, ``normalization``,
    ``answer_target(answer, score)`` (or ``targets_for``), ``ranked_answers`` and
    ``answer_probabilities``; ``ClassifierVQA`` implements the last three for answer classifiers.
    """

    def answer_target(self, answer: str, score: str = "logit") -> Any:
        raise NotImplementedError

    def ranked_answers(self, inputs: dict[str, torch.Tensor], top_k: int) -> list[tuple[str, float]]:
        raise NotImplementedError

    def targets_for(self, inputs: dict[str, torch.Tensor], answers: Sequence[str],
                    score: str) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """The inputs for explaining ``answers`` and one target per answer (a generative model
        adds the answers' tokens to the inputs)."""
        return inputs, [self.answer_target(a, score) for a in answers]

    def answer(self, image: ImageLike, question: str, top_k: int = 5) -> list[tuple[str, float]]:
        """The ``top_k`` answers with their probabilities, best first."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        inputs, _ = self.prepare(load_image(image), question)
        return self.ranked_answers(inputs, top_k)

    def explain(self, image: ImageLike, question: str, answer: str | Sequence[str] | None = None,
                method: MethodSpec | None = None, counterfactual: bool = False, contrast: str | None = None,
                top_k: int = 1, score: str = "logit", layer: nn.Module | str | None = None,
                batched: bool | str = "auto", max_targets_per_backward: int | None = None) -> VQAExplanation:
        """Maps for ``answer`` (one or several; None: the model's top ``top_k`` answers).

        method: the model's default (``default_method``) when None; several ("gradcam,layercam", a
        list, or "all") come from the same forward and backward pass (``method_maps``,
        ``for_method(name)``), ``maps`` holding the first one's.

        counterfactual: negated gradients, "why not this answer". contrast: also the map of the
        first answer's score minus ``contrast``'s. ``notice``: a short note when the model does not
        know images like this one (None otherwise). max_targets_per_backward: answers per batched
        backward (None: auto; see ``mg.explain``).
        """
        pil = load_image(image)
        inputs, geometry = self.prepare(pil, question)
        result = self.explain_prepared(inputs, geometry, question, answer, method=method,
                                       counterfactual=counterfactual, contrast=contrast, top_k=top_k, score=score,
                                       layer=layer, batched=batched, max_targets_per_backward=max_targets_per_backward)
        result.notice = self.domain_notice(pil)
        return result

    def explain_prepared(self, inputs: dict[str, torch.Tensor], geometry: Any, text: str,
                         answer: str | Sequence[str] | None = None, method: MethodSpec | None = None,
                         counterfactual: bool = False, contrast: str | None = None, top_k: int = 1,
                         score: str = "logit", layer: nn.Module | str | None = None,
                         batched: bool | str = "auto", max_targets_per_backward: int | None = None) -> VQAExplanation:
        """``explain`` on inputs from ``prepare(image, text)``, whose pixels may have been changed
        (e.g. an adversarial image); ``text`` is the question they were prepared with."""
        question = text
        check_max_targets(max_targets_per_backward)
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        inputs = self.to_device(inputs)
        top = self.ranked_answers(inputs, max(top_k, 5))
        if answer is None:
            answers = [a for a, _ in top[:top_k]]
        else:
            answers = [answer] if isinstance(answer, str) else list(answer)
            if not answers:
                raise ValueError("answer is an empty list: give at least one answer or None")
        inputs, targets = self.targets_for(inputs, answers + ([contrast] if contrast is not None else []), score)
        if contrast is not None:
            targets[-1] = Difference(targets[0], targets[-1])
        names = self.method_choice(self.default_method if method is None else method)
        readout = [name for name in names if is_readout_method(name)]
        if readout:  # TAM reads caption words; an answer has no such readout here
            able = sorted({r.family for r in registered_adapters("captioning")
                           if getattr(r.adapter, "image_tokens_in_text", False)})
            raise ValueError(f"method {readout[0]!r} reads caption words and is not available for VQA ({self.family!r}). "
                             f"Captioning families that support it: {', '.join(able)}")
        attention = {}
        if any(is_attention_method(n) for n in names):
            attention = {"attention": self.attention_graph(inputs), "readout": self.answer_readout(inputs, targets)}
        exps = self.run_engine(inputs, targets, layer, names, attention, counterfactual=counterfactual,
                               batched=batched, max_targets_per_backward=max_targets_per_backward)
        exps = {name: exp.results_on("cpu") for name, exp in exps.items()}  # results: CPU, float32
        count = len(answers)

        def split(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            image_maps = geometry.invert(maps[:, 0])  # the answers' maps, then the contrast's
            return image_maps[:count], image_maps[count] if contrast is not None else None

        method_maps = {}
        for name, exp in exps.items():  # a pixel-space method's own maps are its pixel maps
            maps, contrast_map = split(exp.maps if exp.pixel_maps is None else exp.pixel_maps)
            method_maps[name] = (maps, exp.layer_maps[:count, 0], contrast_map)
        first = exps[names[0]]
        pixel = next((name for name in names if exps[name].pixel_maps is not None), None)
        # ``maps`` are the first method's CAM maps (for a pixel-space method, those it refines)
        maps, contrast_map = split(first.maps) if first.pixel_maps is not None else \
            (method_maps[names[0]][0], method_maps[names[0]][2])
        probabilities = self.answer_probabilities(inputs, answers)
        weights = first.channel_weights
        return VQAExplanation(
            question=question, answers=answers, scores=first.scores[:count, 0].tolist(), probabilities=probabilities,
            maps=maps, layer_maps=method_maps[names[0]][1], seen=geometry.seen(), method=first.method,
            layer=first.layer_name, model=self.name, score_kind=score, counterfactual=counterfactual,
            contrast=contrast, contrast_map=contrast_map, top_answers=top,
            alphas=None if weights is None else weights[:count, 0], method_maps=method_maps,
            guided_maps=None if pixel is None else method_maps[pixel][0],
        )

    def run_engine(self, inputs: dict[str, torch.Tensor], targets: Sequence[Any], layer: nn.Module | str | None,
                   names: Sequence[str], attention: dict[str, Any], **options: Any) -> dict[str, Any]:
        """{method: Explanation} for the answers' targets from the engine (one forward and one
        batched backward per kind of method); a family whose answers run as several rows over one
        image (chat VLMs) says how its targets meet the explained layer."""
        with self.forward_context():
            return mg.explain(self.model, inputs, targets, self.resolve_layer(layer), list(names),
                              image_key="pixel_values", **options, **self.layer_options, **attention)

    def answer_probabilities(self, inputs: dict[str, torch.Tensor], answers: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def answer_readout(self, inputs: dict[str, torch.Tensor], targets: Sequence[Any]) -> torch.Tensor:
        """(T, 1, rows): where each target's map is read (one question: by default the same rows)."""
        return self.answer_rows(inputs).reshape(1, 1, -1).expand(len(targets), 1, -1)

    def answer_rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(text rows,) weights of the positions the answer is read from (the attention methods'
        readout); a model with an ``attention_graph`` says which."""
        raise NotImplementedError(f"{type(self).__name__} does not say where its answer is read from")


class ClassifierVQA(VQAModel):
    """A VQA model that scores a fixed answer vocabulary (``answers``): the default VQA model, ViLT.

    The target of an answer is its logit (``ClassScore``) or, with score="logprob",
    ``logprob_target``; probabilities come from ``probabilities_of`` (softmax unless the model
    scores answers independently). Ranking and the explained answers' probabilities share one
    forward per prepared inputs."""

    answers: list[str]

    def set_answers(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        self._last_probabilities: tuple[dict[str, Any], torch.Tensor] | None = None

    def answer_key(self, answer: str) -> str:
        """How an answer is looked up in the vocabulary (the default model lower-cases it)."""
        return answer

    def answer_id(self, answer: str) -> int:
        key = self.answer_key(answer) if isinstance(answer, str) else answer
        if key not in self.answer_index:
            shown = ", ".join(self.answers) if len(self.answers) <= 30 else \
                f"{len(self.answers)} answers, e.g. {', '.join(self.answers[:10])}"
            raise ValueError(f"answer {answer!r} is not in the model's answer vocabulary: {shown}")
        return self.answer_index[key]

    def logprob_target(self, index: int) -> Any:
        return ClassLogProb(index)

    def probabilities_of(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def answer_target(self, answer: str, score: str = "logit") -> Any:
        index = self.answer_id(answer)
        return ClassScore(index) if score == "logit" else self.logprob_target(index)

    def _probabilities(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer probabilities, computed once per prepared inputs (the same tensor objects)."""
        cached = self._last_probabilities
        if cached is not None and cached[0].keys() == inputs.keys() and \
                all(cached[0][k] is v for k, v in inputs.items()):
            return cached[1]
        with torch.no_grad(), preserved_state(self.model), self.forward_context():
            probabilities = self.probabilities_of(logits_of(self.model(**self.to_device(inputs))).float())[0]
        self._last_probabilities = (dict(inputs), probabilities)
        return probabilities

    def ranked_answers(self, inputs: dict[str, torch.Tensor], top_k: int) -> list[tuple[str, float]]:
        probabilities = self._probabilities(inputs)
        values, indices = probabilities.topk(min(top_k, len(self.answers)))
        return [(self.answers[int(i)], float(v)) for v, i in zip(values, indices)]

    def answer_probabilities(self, inputs: dict[str, torch.Tensor], answers: Sequence[str]) -> list[float]:
        probabilities = self._probabilities(inputs)
        return [float(probabilities[self.answer_id(a)]) for a in answers]


def load(name: str | Path | nn.Module = "default", processor: Any = None, *, tokenizer: Any = None,
         image_processor: Any = None, trust_remote_code: bool = False, device: DeviceSpec = "auto",
         dtype: DtypeSpec = None) -> VQAModel:
    """A VQA model: "default" (shipped), a directory holding a default-family model, a Hugging Face
    model id or save_pretrained directory, or a transformers model object with its processor (any
    family registered for VQA; README lists them). ``trust_remote_code`` stays off unless you turn it on.

    device: "auto" (CUDA, else Apple MPS, else the CPU), "cpu", "cuda", "cuda:1", "mps"; a model
    object stays on its device unless one is named. dtype: None / "float32", "bfloat16" or
    "float16": the forwards run under autocast in that precision (the weights are not cast); maps
    and scores come back on the CPU in float32."""
    return load_adapter("vqa", name, processor, tokenizer=tokenizer, image_processor=image_processor,
                        trust_remote_code=trust_remote_code, device=device, dtype=dtype)
