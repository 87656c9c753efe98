"""Targeted PGD attacks on a caption word or a VQA answer, and how much localization survives.

The attack works on the model's input pixels within an L-infinity budget ``eps`` (in [0, 1]
pixel units, i.e. eps=8/255 allows a change of 8 grey levels), by projected signed-gradient steps
on log p(target) - log p(original) (captions: the word's teacher-forced log-probabilities; VQA:
the answers' scores). Gradients are taken with ``torch.autograd.grad`` on a copy of the input,
never on the model's parameters. Then the map for the ORIGINAL word/answer is computed on the
adversarial image and compared with the original image's map (and scored against the original
object's mask when one is given). ``method`` is the model's default when None; with several
("gradcam,hirescam", "all") every method's maps come from the same explain call and "methods"
holds each one's comparison ("maps" is the first method's).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr

from mmgradcam.engine import preserved_state

from .metrics import score_map


@dataclass
class AttackResult:
    adversarial: torch.Tensor  # (1, 3, h, w) model input
    original_score: float  # objective before the attack
    final_score: float  # objective after
    flipped: bool
    linf_pixels: float  # the perturbation's L-infinity norm in [0, 1] pixel units
    steps: int


def _bounds(pixel_values: torch.Tensor, normalization) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, std = (torch.tensor(v, dtype=pixel_values.dtype).view(1, -1, 1, 1) for v in normalization)
    return (0 - mean) / std, (1 - mean) / std, std


def pgd(model, inputs: dict, objective: Callable, success: Callable, normalization, eps: float = 8 / 255,
        step: float = 1 / 255, steps: int = 40, context=None) -> AttackResult:
    """Maximize ``objective(output)`` (a scalar) over ``inputs['pixel_values']`` within ``eps``."""
    import contextlib

    x0 = inputs["pixel_values"].detach()
    low, high, std = _bounds(x0, normalization)
    budget, stride = eps / std, step / std
    delta = torch.zeros_like(x0)
    context = context or contextlib.nullcontext
    with preserved_state(model), torch.enable_grad():
        with torch.no_grad(), context():
            output = model(**inputs)
            start = float(objective(output))
            done = bool(success(output))
        used = 0
        while used < steps and not done:
            x = (x0 + delta).requires_grad_(True)
            with context():
                output = model(**{**inputs, "pixel_values": x})
            value = objective(output)
            (grad,) = torch.autograd.grad(value, x)
            delta = torch.maximum(torch.minimum(delta + stride * grad.sign(), budget), -budget)
            delta = torch.maximum(torch.minimum(x0 + delta, high), low) - x0  # stay a valid image
            used += 1
            with torch.no_grad(), context():
                output = model(**{**inputs, "pixel_values": x0 + delta})
                done = bool(success(output))
        final = float(objective(output))
    linf = float((delta * std).abs().max())
    return AttackResult((x0 + delta).detach(), start, final, done, linf, used)


def _per_method(before, after, mask: np.ndarray | None, index: int) -> dict:
    """compare_maps for every method of two explanations computed with the same methods."""
    return {name: compare_maps(before.method_maps[name][0][index].numpy(), after.method_maps[name][0][index].numpy(),
                               mask) for name in before.methods}


def compare_maps(original: np.ndarray, adversarial: np.ndarray, mask: np.ndarray | None) -> dict:
    out = {"spearman": float(spearmanr(original.ravel(), adversarial.ravel()).statistic)
           if original.std() > 0 and adversarial.std() > 0 else None}
    if mask is not None:
        out["original"] = score_map(original, mask)
        out["adversarial"] = score_map(adversarial, mask)
    return out


def attack_caption_word(captioner, image, caption: str, word: str, target: str, eps: float = 8 / 255,
                        steps: int = 40, mask: np.ndarray | None = None, method=None) -> dict:
    """Make the captioner say ``target`` instead of ``word`` (teacher-forced at that position)."""
    import re

    from mmgradcam.tasks.captioning import word_targets

    tokens = captioner.tokenize(caption)
    lowered = [w.lower() for w in tokens.words]
    if word.lower() not in lowered:
        raise ValueError(f"word {word!r} is not in the caption {caption!r} (words: {', '.join(tokens.words)})")
    index = lowered.index(word.lower())
    swapped = captioner.tokenize(re.sub(rf"\b{re.escape(word)}\b", target, caption, count=1, flags=re.IGNORECASE))
    inputs, geometry = captioner.prepare(image, caption)
    original_word = word_targets(tokens, captioner.text_logits_from_end)[0][index]
    swapped_inputs = captioner.batch_inputs(inputs["pixel_values"], [swapped])
    target_word = word_targets(swapped, captioner.text_logits_from_end)[0][index]
    if swapped_inputs["input_ids"].shape != inputs["input_ids"].shape:
        raise ValueError(f"{target!r} and {word!r} must have the same number of tokens for this attack")
    # the prefix before the word is the same in both captions: one forward scores both words
    objective = lambda out: (target_word(out) - original_word(out)).sum()  # noqa: E731
    success = lambda out: bool((target_word(out) > original_word(out)).all())  # noqa: E731
    result = pgd(captioner.model, inputs, objective, success, captioner.normalization, eps=eps, steps=steps,
                 context=captioner.forward_context)
    before = captioner.explain_prepared(inputs, geometry, caption, method=method)
    after = captioner.explain_prepared({**inputs, "pixel_values": result.adversarial}, geometry, caption,
                                       method=method)
    generated = captioner.generate_from_pixels(result.adversarial)[0] if hasattr(captioner, "generate_from_pixels") \
        else None
    return {
        "word": word, "target": target, "word_index": index, "eps": eps, "linf_pixels": result.linf_pixels,
        "steps": result.steps, "flipped": result.flipped, "objective_before": result.original_score,
        "objective_after": result.final_score, "adversarial_caption": generated,
        "word_logprob_before": before.word_logprobs[index], "word_logprob_after": after.word_logprobs[index],
        "maps": compare_maps(before.maps[index].numpy(), after.maps[index].numpy(), mask),
        "method": before.method, "methods": _per_method(before, after, mask, index),
        "_arrays": {"original_map": before.maps[index].numpy(), "adversarial_map": after.maps[index].numpy(),
                    "adversarial_input": result.adversarial[0].numpy(), "original_input": inputs["pixel_values"][0].numpy()},
    }


def attack_vqa_answer(model, image, question: str, answer: str, target: str, eps: float = 8 / 255, steps: int = 40,
                      mask: np.ndarray | None = None, method=None) -> dict:
    """Make the VQA model prefer ``target`` over ``answer``."""
    inputs, geometry = model.prepare(image, question)
    full, (original, wanted) = model.targets_for(inputs, [answer, target], "logit")
    objective = lambda out: (wanted(out) - original(out)).sum()  # noqa: E731
    success = lambda out: bool((wanted(out) > original(out)).all())  # noqa: E731
    result = pgd(model.model, full, objective, success, model.normalization, eps=eps, steps=steps,
                 context=model.forward_context)
    before = model.explain_prepared(inputs, geometry, question, answer, method=method)
    after = model.explain_prepared({**inputs, "pixel_values": result.adversarial}, geometry, question, answer,
                                   method=method)
    return {
        "answer": answer, "target": target, "eps": eps, "linf_pixels": result.linf_pixels, "steps": result.steps,
        "flipped": result.flipped, "objective_before": result.original_score, "objective_after": result.final_score,
        "top_answer_after": after.top_answers[0][0] if after.top_answers else None,
        "maps": compare_maps(before.map.numpy(), after.map.numpy(), mask),
        "method": before.method, "methods": _per_method(before, after, mask, 0),
        "_arrays": {"original_map": before.map.numpy(), "adversarial_map": after.map.numpy(),
                    "adversarial_input": result.adversarial[0].numpy(), "original_input": inputs["pixel_values"][0].numpy()},
    }
