"""LLaVA-1.5 on a tiny random-weight config (CLIP vision tower, Llama decoder, in-memory byte-level
BPE tokenizer with LLaVA's chat template and ``<image>`` token), saved with save_pretrained and
loaded by path through captioning.load / vqa.load: the chat layout, word maps at the image size,
batched equal to looped, Grad-CAM checked by hand, generative VQA, the CLI's --prompt."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmgradcam.tasks import captioning, chat_vlm, vqa
from chat_checks import (answers_batched_equal_alone, batch_equals_alone, batched_equals_looped,
                         eval_run_with_a_prompt, explain_leaving_the_model, frozen_and_bf16)
from hf_tiny import tiny_llava, save_tiny

CAPTION = "two circles, a triangle above the squares"
WORDS = ["two", "circles", "a", "triangle", "above", "the", "squares"]
QUESTION = "what color is the circle ?"
# 40x60: the CLIP processor resizes the short side to 84 (40x60 -> 84x126) and center-crops 84x84
IMAGE = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8"))
GRID = (6, 6)  # 84 px / patch 14


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llava") / "tiny-llava", tiny_llava(image_size=84))


@pytest.fixture(scope="module")
def cap(saved):
    return captioning.load(str(saved))


@pytest.fixture(scope="module")
def answerer(saved):
    return vqa.load(str(saved))


def _by_hand_inputs(cap, caption: str, prompt: str = "Describe the image.") -> dict:
    """The chat written out by hand (LLaVA-1.5's layout), through the processor on the real image."""
    text = f"USER: <image>\n{prompt} ASSISTANT: {caption}"
    return dict(cap.chat(images=IMAGE, text=text, return_tensors="pt"))


def test_loaded_by_path_with_the_preset_layer(cap, answerer):
    assert cap.family == answerer.family == "llava"
    assert type(cap).__name__ == "LlavaCaptioner" and type(answerer).__name__ == "LlavaVQA"
    # vision_feature_layer=-2 of 3 blocks: hidden state 2, the output of block 1
    assert cap.default_layer == answerer.default_layer == "model.vision_tower.encoder.layers.1"
    assert "vision_feature_layer" in cap.layer_reason
    assert cap.prompt_text("Describe the image.") == "USER: <image>\nDescribe the image. ASSISTANT:"
    assert cap.vision_grid() == GRID


def test_the_caption_is_the_assistants_reply(cap):
    tokens = cap.tokenize(CAPTION)
    by_hand = _by_hand_inputs(cap, CAPTION)
    assert tokens.input_ids.tolist() == by_hand["input_ids"].tolist()  # the same sequence, image tokens expanded
    ids = tokens.input_ids[0]
    assert int((ids == cap.image_token_id).sum()) == GRID[0] * GRID[1]  # CLS dropped
    for positions in tokens.word_positions:
        assert all(ids[p + 1] == t for p, t in positions)  # the logit before a token predicts it
    assert tokens.words == WORDS
    assert max(len(p) for p in tokens.word_positions) >= 2  # words merged from subword tokens


def test_word_maps_at_the_image_size_and_word_scores(cap):
    result = cap.explain(IMAGE, CAPTION)
    assert result.words == WORDS
    assert result.maps.shape == (7, 40, 60) and result.layer_maps.shape == (7, *GRID)
    assert torch.count_nonzero(result.layer_maps) > 0
    # resize 40 -> 84 (x2.1: 60 -> 126), crop 84 of 126: 21 px (10 original px) cut on each side
    seen = result.seen
    assert not seen[:, :9].any() and not seen[:, -9:].any() and seen[:, 11:49].all()
    assert (result.maps[:, ~seen] == 0).all()
    # each word's log-prob is the teacher-forced sum over its tokens
    tokens = cap.tokenize(CAPTION)
    with torch.no_grad():
        logits = cap.model(**_by_hand_inputs(cap, CAPTION)).logits
    logprobs = torch.log_softmax(logits[0].float(), -1)
    for positions, score in zip(tokens.word_positions, result.word_logprobs):
        assert score == pytest.approx(float(sum(logprobs[p, t] for p, t in positions)), rel=1e-4, abs=1e-5)


def test_gradcam_by_hand(cap):
    """One forward and one backward per word, Grad-CAM computed by hand from a hook on the preset
    layer: ReLU(sum_c mean-gradient_c * activation_c) over the patch grid, CLS dropped."""
    result = cap.explain(IMAGE, CAPTION, method="gradcam")
    tokens = cap.tokenize(CAPTION)
    model = cap.model
    layer = model.get_submodule(cap.default_layer)
    inputs = _by_hand_inputs(cap, CAPTION)
    for j, positions in enumerate(tokens.word_positions):
        captured = {}
        handle = layer.register_forward_hook(lambda module, args, output: captured.__setitem__("a", output))
        try:
            logits = model(**inputs).logits
        finally:
            handle.remove()
        logprobs = torch.log_softmax(logits[0].float(), -1)
        score = sum(logprobs[p, t] for p, t in positions)
        activation = captured["a"]
        gradient, = torch.autograd.grad(score, activation)
        acts, grads = activation[0, 1:].detach(), gradient[0, 1:]  # CLS dropped: (36, C)
        weights = grads.mean(dim=0)  # the mean gradient per channel
        cam = torch.relu(acts @ weights).reshape(GRID)
        torch.testing.assert_close(result.layer_maps[j], cam, rtol=1e-4, atol=1e-6)
        assert result.word_logprobs[j] == pytest.approx(float(score.detach()), rel=1e-5)


def test_batched_equals_looped(cap):
    batched_equals_looped(cap, IMAGE, CAPTION, "gradcam,hirescam")  # also in chunks of two words
    other = Image.fromarray((np.random.default_rng(1).random((50, 50, 3)) * 255).astype("uint8"))
    batch_equals_alone(cap, [IMAGE, other], [CAPTION, "a red circle"], "gradcam,hirescam")  # captions of two lengths, padded


@pytest.mark.parametrize("method", ["all", "tam", "attention-gradcam", "relevance", "guided-gradcam"])
def test_every_method_and_the_model_left_as_it_was(cap, method):
    # "all": the CAM methods and the attention methods over the language model's sequence
    result = explain_leaving_the_model(cap, IMAGE, CAPTION, method)
    assert len(result.words) == 7
    if method != "all":
        assert torch.count_nonzero(result.for_method(method).layer_maps) > 0


def test_a_layer_of_the_language_model_reads_the_image_tokens(cap):
    """Any layer is nameable: a decoder block's hidden states at the image tokens' positions, by hand."""
    layer = "model.language_model.layers.0"
    result = cap.explain(IMAGE, CAPTION, layer=layer)
    assert result.layer_maps.shape == (7, *GRID) and torch.count_nonzero(result.layer_maps) > 0
    tokens = cap.tokenize(CAPTION)
    inputs = _by_hand_inputs(cap, CAPTION)
    image = (inputs["input_ids"][0] == cap.image_token_id).nonzero().flatten()
    captured = {}
    handle = cap.model.get_submodule(layer).register_forward_hook(lambda m, a, o: captured.__setitem__("a", o))
    try:
        logits = cap.model(**inputs).logits
    finally:
        handle.remove()
    hidden = captured["a"][0] if isinstance(captured["a"], tuple) else captured["a"]
    score = sum(torch.log_softmax(logits[0].float(), -1)[p, t] for p, t in tokens.word_positions[3])
    gradient, = torch.autograd.grad(score, hidden)
    acts, grads = hidden[0, image].detach(), gradient[0, image]
    cam = torch.relu(acts @ grads.mean(dim=0)).reshape(GRID)
    torch.testing.assert_close(result.layer_maps[3], cam, rtol=1e-4, atol=1e-6)


def test_the_last_vision_block_reaches_nothing(cap):
    with pytest.warns(UserWarning, match="every gradient at layer .* is zero"):
        cap.explain(IMAGE, "a red circle", layer="model.vision_tower.encoder.layers.2")


def test_frozen_weights_and_bf16(saved):
    frozen_and_bf16(*tiny_llava(image_size=84), IMAGE, CAPTION, correlation=0.95)


def test_generated_caption_and_prompt(saved):
    prompted = captioning.load(str(saved), prompt="What is in the picture?")
    assert prompted.prompt_text(prompted.prompt).endswith("What is in the picture? ASSISTANT:")
    tokens = prompted.tokenize(CAPTION)
    by_hand = _by_hand_inputs(prompted, CAPTION, "What is in the picture?")
    assert tokens.input_ids.tolist() == by_hand["input_ids"].tolist()
    caption = prompted.generate(IMAGE, max_words=3)
    assert caption == prompted.generate_batch([IMAGE])[0][:len(caption)]
    with pytest.raises(ValueError, match="captions without a prompt; .*llava"):
        captioning.load("default", prompt="Describe the image.")


# ----------------------------------------------------------------------------- VQA
def test_vqa_answers_batched_and_scored_by_hand(answerer):
    answers = ["red", "two circles", "a blue square"]
    together = answerer.explain(IMAGE, QUESTION, answer=answers)
    assert together.answers == answers and together.maps.shape == (3, 40, 60)
    assert torch.count_nonzero(together.layer_maps) > 0
    for k, answer in enumerate(answers):
        alone = answerer.explain(IMAGE, QUESTION, answer=answer)
        assert alone.score == pytest.approx(together.scores[k], rel=1e-5)
        torch.testing.assert_close(alone.map, together.maps[k], rtol=1e-4, atol=1e-6)
        assert alone.probabilities[0] == pytest.approx(float(np.exp(alone.score)), rel=1e-4)
    # a score by hand: the question turn, then the answer as the reply, one forward of the model
    prompt = (f"USER: <image>\n{QUESTION}\nAnswer the question using a single word or phrase. ASSISTANT:")
    question = dict(answerer.chat(images=IMAGE, text=prompt, return_tensors="pt"))
    full = dict(answerer.chat(images=IMAGE, text=prompt + " two circles", return_tensors="pt"))
    with torch.no_grad():
        logits = answerer.vlm(**full).logits[0].float()
    start = question["input_ids"].shape[1]
    ids = full["input_ids"][0]
    expected = sum(float(torch.log_softmax(logits[p - 1], -1)[ids[p]]) for p in range(start, len(ids)))
    assert len(ids) - start >= 2 and together.scores[1] == pytest.approx(expected, rel=1e-4)


def test_vqa_top_answer_from_generation(answerer):
    top = answerer.answer(IMAGE, QUESTION, top_k=5)  # explain ranks the candidates of a 5-beam search
    assert 1 <= len(top) <= 5 and top == sorted(top, key=lambda a: -a[1])
    result = answerer.explain(IMAGE, QUESTION)
    assert result.answer == top[0][0] and result.probabilities[0] == pytest.approx(top[0][1], rel=1e-4)
    assert result.score == pytest.approx(float(np.log(top[0][1])), rel=1e-4)
    assert result.maps.shape == (1, 40, 60)


@pytest.mark.parametrize("layer", [None, "model.language_model.layers.0"])
def test_vqa_methods_and_layers_batched_equal_looped(answerer, layer):
    """Attention methods and a language-model layer run on the K answer rows; each answer's map
    is its own row's, the same as explaining it alone."""
    answers = ["red", "two circles"]
    method = "gradcam,attention-gradcam,relevance"
    answers_batched_equal_alone(answerer, IMAGE, QUESTION, answers, method=method, layer=layer)
    contrast = answerer.explain(IMAGE, QUESTION, answer="red", contrast="blue", layer=layer)
    assert contrast.contrast_map.shape == (40, 60)
    with pytest.raises(ValueError, match="reads caption words"):
        answerer.explain(IMAGE, QUESTION, answer="red", method="tam")


def test_vqa_lm_head_runs_at_the_answers_only_with_the_same_maps(answerer, monkeypatch):
    """K answer rows: the LM head computes the logits from the question's last position on (the
    longest answer + 1 rows), and maps and scores equal those from the whole sequence's logits."""
    answers = ["red", "a blue square"]
    longest = max(len(answerer._answer_ids(a)) for a in answers)
    rows = []
    head = answerer.vlm.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: rows.append(tuple(output.shape[:2])))
    try:
        kept = answerer.explain(IMAGE, QUESTION, answer=answers, method="gradcam,relevance")
    finally:
        handle.remove()
    # the two answers' rows (generation's own forwards, with their own row counts, aside)
    assert {r for r in rows if r[0] == 2} == {(2, longest + 1)}
    monkeypatch.setattr(chat_vlm, "takes_logits_to_keep", lambda model: False)
    whole = answerer.explain(IMAGE, QUESTION, answer=answers, method="gradcam,relevance")
    assert kept.scores == pytest.approx(whole.scores, rel=1e-5)
    for name in ("gradcam", "relevance"):
        torch.testing.assert_close(kept.for_method(name).maps, whole.for_method(name).maps, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- CLI
def test_cli_caption_with_a_prompt(saved, tmp_path):
    IMAGE.save(tmp_path / "img.png")
    prompt = "What is in the picture?"
    from mmgradcam.cli import main

    assert main(["caption", str(tmp_path / "img.png"), "--model", str(saved), "--prompt", prompt,
                 "--caption", CAPTION, "--out", str(tmp_path / "out")]) == 0
    assert np.load(tmp_path / "out" / "maps.npz")["maps"].shape == (7, 40, 60)
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["prompt"] == prompt and summary["caption"] == CAPTION
    written = [w["logprob"] for w in summary["words"]]
    expected = captioning.load(str(saved), prompt=prompt).explain(IMAGE, CAPTION).word_logprobs
    assert written == pytest.approx(expected, rel=1e-4)
    assert written != pytest.approx(captioning.load(str(saved)).explain(IMAGE, CAPTION).word_logprobs, rel=1e-4)


def test_eval_with_a_prompt(saved, tmp_path):
    eval_run_with_a_prompt(saved, tmp_path)
    assert json.loads((tmp_path / "ev" / "run.json").read_text())["prompt"] == "Describe the shapes."


def test_the_lm_head_runs_at_the_reply_only_with_the_same_maps(cap, monkeypatch):
    """``logits_to_keep``: the LM head computes the logits from the first word's to the end only,
    and the maps and word scores equal those from the whole sequence's logits."""
    tokens = cap.tokenize(CAPTION)
    first = min(p for word in tokens.word_positions for p, _ in word)
    rows = []
    head = cap.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: rows.append(output.shape[1]))
    try:
        kept = cap.explain(IMAGE, CAPTION, method="gradcam,attention-gradcam")
    finally:
        handle.remove()
    assert rows and set(rows) == {tokens.input_ids.shape[1] - first}
    # two captions of different lengths, right-padded in one batch: the window covers both
    captions = [CAPTION, "a red circle"]
    pair_kept, scores_kept = cap.explain_batch([IMAGE, IMAGE], captions), cap.score_batch([IMAGE, IMAGE], captions)
    monkeypatch.setattr(chat_vlm, "takes_logits_to_keep", lambda model: False)
    whole = cap.explain(IMAGE, CAPTION, method="gradcam,attention-gradcam")
    pair_whole, scores_whole = cap.explain_batch([IMAGE, IMAGE], captions), cap.score_batch([IMAGE, IMAGE], captions)
    for kept_one, whole_one, kept_scores, whole_scores in zip(pair_kept, pair_whole, scores_kept, scores_whole):
        torch.testing.assert_close(kept_one.maps, whole_one.maps, rtol=1e-4, atol=1e-6)
        assert kept_one.word_logprobs == pytest.approx(whole_one.word_logprobs, rel=1e-5)
        assert kept_scores == pytest.approx(whole_scores, rel=1e-5)
    for name in ("gradcam", "attention-gradcam"):
        torch.testing.assert_close(kept.for_method(name).maps, whole.for_method(name).maps, rtol=1e-4, atol=1e-6)
    assert kept.word_logprobs == pytest.approx(whole.word_logprobs, rel=1e-5)
