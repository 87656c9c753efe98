"""VQA: maps for an answer (why), for its negation (why not), and for answer A against B.

``load(name)`` gives a VQA model with ``.answer(image, question, top_k)`` and
``.explain(image, question, answer=None)``. The target is the answer's pre-softmax score (as in
the original Grad-CAM VQA code) or, with ``score="logprob"``, its log-probability; generative
answerers use the sum of the answer tokens' log-probabilities. Several answers are explained from
one forward pass and one batched backward. Maps come back at the original image size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mmgradcam as mg

from .common import Adapter, load_adapter
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
    """Maps for the explained answers (the first one is ``answer``), at the ORIGINAL image size."""

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
    alphas: torch.Tensor | None = None  # (K, C): Grad-CAM channel weights (mean gradient)

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
        return out


class VQAModel(Adapter):
    """What every VQA adapter provides; ``answer`` and ``explain`` are shared by all families.

    Subclasses set ``model``, ``default_layer`` (+ ``layer_reason``) and implement
    ``model_inputs(image, question) -> (inputs, geometry)``, ``answer_target(answer, score)``
    and ``answer_scores(image, question) -> (answers, probabilities)`` ranked.
    """

    def model_inputs(self, image: ImageLike, question: str) -> tuple[dict[str, torch.Tensor], Any]:
        raise NotImplementedError

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
        inputs, _ = self.model_inputs(load_image(image), question)
        return self.ranked_answers(inputs, top_k)

    def explain(self, image: ImageLike, question: str, answer: str | Sequence[str] | None = None,
                method: str = "gradcam", counterfactual: bool = False, contrast: str | None = None,
                top_k: int = 1, score: str = "logit", layer: nn.Module | str | None = None,
                batched: bool | str = "auto") -> VQAExplanation:
        """Maps for ``answer`` (one or several; None: the model's top ``top_k`` answers).

        counterfactual: negated gradients, "why not this answer". contrast: also the map of the
        first answer's score minus ``contrast``'s.
        """
        inputs, geometry = self.model_inputs(load_image(image), question)
        return self.explain_inputs(inputs, geometry, question, answer, method=method, counterfactual=counterfactual,
                                   contrast=contrast, top_k=top_k, score=score, layer=layer, batched=batched)

    def explain_inputs(self, inputs: dict[str, torch.Tensor], geometry: Any, question: str,
                       answer: str | Sequence[str] | None = None, method: str = "gradcam",
                       counterfactual: bool = False, contrast: str | None = None, top_k: int = 1,
                       score: str = "logit", layer: nn.Module | str | None = None,
                       batched: bool | str = "auto") -> VQAExplanation:
        """``explain`` on already prepared model inputs (e.g. an adversarial image)."""
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
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
        with self.forward_context():
            exp = mg.explain(self.model, inputs, targets, self.resolve_layer(layer), method,
                             counterfactual=counterfactual, batched=batched, image_key="pixel_values",
                             **self.layer_options)
        maps = geometry.invert(exp.maps[:, 0])
        probabilities = self.answer_probabilities(inputs, answers)
        count = len(answers)
        return VQAExplanation(
            question=question, answers=answers, scores=exp.scores[:count, 0].tolist(), probabilities=probabilities,
            maps=maps[:count], layer_maps=exp.layer_maps[:count, 0], seen=geometry.seen(), method=exp.method,
            layer=exp.layer_name, model=self.name, score_kind=score, counterfactual=counterfactual,
            contrast=contrast, contrast_map=maps[count] if contrast is not None else None, top_answers=top,
            alphas=exp.gradients[:count, 0].mean(dim=(-2, -1)),
        )

    def answer_probabilities(self, inputs: dict[str, torch.Tensor], answers: Sequence[str]) -> list[float]:
        raise NotImplementedError


def load(name: str | Path | nn.Module = "default", processor: Any = None, *, tokenizer: Any = None,
         image_processor: Any = None, trust_remote_code: bool = False) -> VQAModel:
    """A VQA model: "default" (shipped), a directory holding a default-family model, a Hugging Face
    model id or save_pretrained directory (BLIP VQA, ViLT), or a transformers model object with its
    processor. ``trust_remote_code`` stays off unless you turn it on."""
    return load_adapter("vqa", name, processor, tokenizer=tokenizer, image_processor=image_processor,
                        trust_remote_code=trust_remote_code)
