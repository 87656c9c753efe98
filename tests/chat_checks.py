"""Checks that the chat VLM family tests share (on the tiny models of hf_tiny): every method from
one explain with the model left as it was, batched equal to looped, a batch of images of several
layouts equal to each image alone, frozen weights and bf16, K answers equal to each alone, and a
reply's log-probability by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmgradcam.engine.state import snapshot
from mmgradcam.tasks import captioning

CAM_AND_ATTENTION = {"gradcam", "hirescam", "attention-gradcam", "relevance"}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def hooked_forward(model, layer: str, inputs: dict) -> tuple:
    """The logits of ``model(**inputs)`` and the output of its layer ``layer`` (a tuple's first
    element), for a Grad-CAM written out by hand."""
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: captured.__setitem__("a", o))
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    output = captured["a"]
    return logits, output[0] if isinstance(output, tuple) else output


def explain_leaving_the_model(cap, image, caption: str, method: str):
    """``cap.explain(image, caption, method=method)``, asserting that the model's mode, hooks,
    requires_grad and .grad are as they were, that every method's maps are finite, one per word
    at the image size, and that "all" holds the CAM and the attention methods. Returns the result."""
    before = snapshot(cap.model)
    result = cap.explain(image, caption, method=method)
    after = snapshot(cap.model)
    assert [t for _, t in before["training"]] == [t for _, t in after["training"]]
    assert [h for _, h in before["hooks"]] == [h for _, h in after["hooks"]]
    assert [(r, g) for _, r, g in before["params"]] == [(r, g) for _, r, g in after["params"]]
    for name in result.methods:
        maps = result.for_method(name).maps
        assert maps.shape == (len(result.words), image.height, image.width) and torch.isfinite(maps).all()
    if method == "all":
        assert CAM_AND_ATTENTION <= set(result.methods)
    return result


def batched_equals_looped(cap, image, caption: str, methods: str):
    """The words' maps from one batched backward, from one backward per word and from backwards
    of two words each, compared. Returns the batched result."""
    together = cap.explain(image, caption, method=methods, batched=True)
    looped = cap.explain(image, caption, method=methods, batched=False)
    chunked = cap.explain(image, caption, method=methods, max_targets_per_backward=2)
    for name in together.methods:
        torch.testing.assert_close(together.for_method(name).maps, looped.for_method(name).maps, **TOLERANCE)
        torch.testing.assert_close(together.for_method(name).maps, chunked.for_method(name).maps, **TOLERANCE)
    return together


def batch_equals_alone(cap, images, captions, methods: str) -> None:
    """``explain_batch`` and ``score_batch`` over images of several layouts (one forward per layout)
    against each image explained alone: the same words, maps and log-probabilities."""
    batch = cap.explain_batch(images, captions, method=methods)
    scores = cap.score_batch(images, captions)
    for image, caption, found, score in zip(images, captions, batch, scores):
        alone = cap.explain(image, caption, method=methods)
        assert found.words == alone.words and found.maps.shape == (len(alone.words), image.height, image.width)
        for name in alone.methods:
            torch.testing.assert_close(found.for_method(name).maps, alone.for_method(name).maps, **TOLERANCE)
        assert found.word_logprobs == pytest.approx(alone.word_logprobs, rel=1e-4)
        assert score == pytest.approx(alone.word_logprobs, rel=1e-4)


def from_preprocessed_pixels(cap, images, captions, refused_short: str):
    """The eval loop's path: the pixels ``preprocess`` makes of ``images``, concatenated, captioned
    and explained with the images' geometries as ``generate_batch`` and ``explain`` do per image;
    without the geometries, or with the last pixel row missing (``refused_short`` the message),
    refused. Returns the concatenated pixels."""
    prepared = [cap.preprocess(image) for image in images]
    pixels = torch.cat([inputs["pixel_values"] for inputs, _ in prepared])
    geometries = [geometry for _, geometry in prepared]
    assert cap.generate_from_pixels(pixels, max_words=3, geometries=geometries) == \
        cap.generate_batch(images, max_words=3)
    with pytest.raises(ValueError, match="needs each image's geometry"):
        cap.generate_from_pixels(pixels)
    found = cap.explain_pixels(pixels, geometries, captions)
    for image, caption, result in zip(images, captions, found):
        torch.testing.assert_close(result.maps, cap.explain(image, caption).maps, **TOLERANCE)
    with pytest.raises(ValueError, match=refused_short):
        cap.explain_pixels(pixels[:-1], geometries, captions)
    return pixels


def cli_caption_and_vqa(model_path, image, caption: str, question: str, tmp_path) -> dict:
    """``mmgradcam caption`` (a given caption) and ``mmgradcam vqa`` (two given answers) in-process
    on ``image`` saved as a file: maps at the image size, the caption recorded. Returns the caption
    run's result.json."""
    from mmgradcam.cli import main

    image.save(tmp_path / "img.png")
    assert main(["caption", str(tmp_path / "img.png"), "--model", str(model_path), "--caption", caption,
                 "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["caption"] == caption
    assert np.load(tmp_path / "out" / "maps.npz")["maps"].shape == (len(summary["words"]), image.height, image.width)
    assert main(["vqa", str(tmp_path / "img.png"), question, "--model", str(model_path), "--answer", "red",
                 "--answer", "two circles", "--out", str(tmp_path / "vq")]) == 0
    assert np.load(tmp_path / "vq" / "maps.npz")["maps"].shape == (2, image.height, image.width)
    return summary


def eval_run_with_a_prompt(model_path, tmp_path) -> None:
    """A tiny eval run (2 shapes images, references, gradcam and relevance) of the model saved at
    ``model_path`` with a captioning prompt, which its summary records."""
    from mmgradcam.cli import main
    from mmgradcam.data.shapes import write_split

    paths = write_split(tmp_path / "data", "test", 2, seed=1)
    assert main(["eval", "--instances", str(paths["instances"]), "--captions", str(paths["captions"]),
                 "--images", str(paths["images"]), "--references", "--model", str(model_path),
                 "--prompt", "Describe the shapes.", "--method", "gradcam,relevance", "--workers", "0",
                 "--quiet", "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["images"] == 2 and summary["config"]["prompt"] == "Describe the shapes."


def frozen_and_bf16(model, processor, image, caption: str, correlation: float) -> None:
    """``model``'s maps with every parameter frozen equal its maps trainable (the explained layer
    still gets its gradient), and its bf16 (autocast) maps track them: per word, a correlation
    above ``correlation``."""
    reference = captioning.load(model, processor).explain(image, caption)
    model.requires_grad_(False)
    frozen = captioning.load(model, processor).explain(image, caption)
    torch.testing.assert_close(frozen.maps, reference.maps)
    assert not any(p.requires_grad for p in model.parameters())
    half = captioning.load(model, processor, dtype="bfloat16").explain(image, caption)
    for j in range(len(reference.words)):
        a, b = half.maps[j].flatten().numpy(), reference.maps[j].flatten().numpy()
        assert np.corrcoef(a, b)[0, 1] > correlation


def answers_batched_equal_alone(answerer, image, question: str, answers: list[str], **options):
    """K answers explained in one call (``options``: method, layer) against each answer alone: the
    same scores and every method's maps. Returns the batched result."""
    together = answerer.explain(image, question, answer=answers, **options)
    assert together.answers == answers and together.maps.shape == (len(answers), image.height, image.width)
    for k, answer in enumerate(answers):
        alone = answerer.explain(image, question, answer=answer, **options)
        assert alone.score == pytest.approx(together.scores[k], rel=1e-5)
        for name in together.methods:
            torch.testing.assert_close(alone.for_method(name).map, together.for_method(name).maps[k], **TOLERANCE)
    return together


def resized_with_nothing_cut(geometry, size: tuple[int, int], input_size: tuple[int, int], rel: float) -> None:
    """A measured geometry of an image of ``size`` that the processor resizes (whole, no offset,
    nothing cut) to ``input_size``."""
    assert geometry.input_size == input_size and geometry.valid_size is None
    assert geometry.scale == pytest.approx((size[0] / input_size[0], size[1] / input_size[1]), rel=rel)
    assert geometry.offset == pytest.approx((0.0, 0.0), abs=0.05)
    assert bool(geometry.seen().all())


def reply_logprob_by_hand(answerer, question: dict, full: dict) -> tuple[int, float]:
    """The reply's token count and summed log-probability, by one forward of the model on ``full``
    (the processor's inputs of the question turn and the reply) and ``question`` (of the turn alone)."""
    with torch.no_grad():
        logits = answerer.vlm(**full).logits[0].float()
    start, ids = question["input_ids"].shape[1], full["input_ids"][0]
    return len(ids) - start, sum(float(torch.log_softmax(logits[p - 1], -1)[ids[p]]) for p in range(start, len(ids)))
