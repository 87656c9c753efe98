"""BLIP-2 (OPT) and InstructBLIP (Llama) on tiny random-weight configs (BLIP vision encoder with
CLS, 2-layer Q-Former with 4 queries, in-memory BPE tokenizer with a BOS in front, the real
Blip2Processor / InstructBlipProcessor with a WordPiece Q-Former tokenizer), saved with
save_pretrained and loaded by path: the query-token layout (no chat template), word maps at the
image size of a non-square image stretched back from the square input, Grad-CAM by brute force at
the vision encoder's last block, batched equal to looped, layers without a grid refused, VQA with
several answers."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmgradcam.engine.state import snapshot
from mmgradcam.tasks import captioning, vqa
from chat_checks import batch_equals_alone, batched_equals_looped, hooked_forward
from hf_tiny import tiny_blip2, save_tiny

CAPTION = "two circles, a triangle above the squares"
WORDS = ["two", "circles", "a", "triangle", "above", "the", "squares"]
QUESTION = "what color is the circle ?"
# 40x60: the BLIP processor resizes to 42x42 without keeping the aspect ratio
IMAGE = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8"))
SIZE, GRID, QUERIES = 42, (3, 3), 4  # 42 px / patch 14, CLS dropped; 4 query tokens in the LM sequence


@pytest.fixture(scope="module", params=["blip2", "instructblip"])
def saved(request, tmp_path_factory):
    instruct = request.param == "instructblip"
    built = tiny_blip2(instruct=instruct, text="llama" if instruct else "opt", image_size=SIZE, query_tokens=QUERIES)
    return request.param, save_tiny(tmp_path_factory.mktemp(request.param) / "tiny", built)


@pytest.fixture(scope="module")
def cap(saved):
    return captioning.load(str(saved[1]))


@pytest.fixture(scope="module")
def answerer(saved):
    return vqa.load(str(saved[1]))


def _by_hand_inputs(adapter, prompt: str, reply: str, image=IMAGE) -> dict:
    """The family's own layout through its processor: query tokens, BOS, the prompt, the reply
    (after a space when the prompt is not empty); InstructBLIP's Q-Former reads the prompt."""
    text = f"{prompt} {reply}" if prompt else reply
    out = dict(adapter.chat(images=image, text=text, return_tensors="pt"))
    if "qformer_input_ids" in out:
        q = adapter.chat.qformer_tokenizer(prompt, return_tensors="pt")
        out["qformer_input_ids"], out["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
    return out


def test_loaded_by_path_with_the_preset_layer(saved, cap, answerer):
    family = saved[0]
    assert cap.family == answerer.family == family
    assert cap.default_layer == answerer.default_layer == "vision_model.encoder.layers.1"
    assert "Q-Former" in cap.layer_reason and cap.vision_grid() == GRID
    if family == "blip2":
        assert cap.prompt == "" and answerer.question_prompt == "Question: {question} Answer:"
    else:
        assert cap.prompt == "A short image description:" and answerer.question_prompt == "{question}"


def test_the_caption_follows_the_query_tokens_and_the_prompt(cap):
    tokens = cap.tokenize(CAPTION)
    by_hand = _by_hand_inputs(cap, cap.prompt, CAPTION)
    assert tokens.input_ids.tolist() == by_hand["input_ids"].tolist()
    ids = tokens.input_ids[0].tolist()
    assert ids[:QUERIES] == [cap.image_token_id] * QUERIES and ids[QUERIES] == cap.tokenizer.bos_token_id
    for positions in tokens.word_positions:
        assert all(ids[p + 1] == t for p, t in positions)  # the logit before a token predicts it
    assert tokens.words == WORDS
    assert max(len(p) for p in tokens.word_positions) >= 2  # words merged from subword tokens
    if "qformer_input_ids" in by_hand:  # InstructBLIP: the instruction goes to the Q-Former too
        assert tokens.extra_inputs["qformer_input_ids"].tolist() == by_hand["qformer_input_ids"].tolist()


def test_gradcam_by_brute_force_and_the_maps_stretched_back(cap):
    """One forward and one backward per word, Grad-CAM from a hook on the vision encoder's last
    block: CLS dropped, ReLU(sum_c mean-gradient_c * activation_c) on the 3x3 patch grid; the maps
    at the image size are it resized to the 42x42 input, then to 40x60 (each axis on its own)."""
    result = cap.explain(IMAGE, CAPTION, method="gradcam")
    assert result.maps.shape == (7, 40, 60) and result.layer_maps.shape == (7, *GRID)
    assert bool(result.seen.all())  # a stretch, not a crop: every pixel is seen
    geometry = cap.processor.geometry((40, 60))
    assert geometry.scale == pytest.approx((40 / SIZE, 60 / SIZE), rel=1e-3)
    tokens = cap.tokenize(CAPTION)
    inputs = _by_hand_inputs(cap, cap.prompt, CAPTION)
    for j, positions in enumerate(tokens.word_positions):
        logits, activation = hooked_forward(cap.model, cap.default_layer, inputs)
        logprobs = torch.log_softmax(logits[0].float(), -1)
        score = sum(logprobs[p, t] for p, t in positions)
        gradient, = torch.autograd.grad(score, activation)
        acts, grads = activation[0, 1:].detach(), gradient[0, 1:]  # (9, C), CLS dropped
        cam = torch.relu(acts @ grads.mean(dim=0)).reshape(GRID)
        torch.testing.assert_close(result.layer_maps[j], cam, rtol=1e-4, atol=1e-6)
        assert result.word_logprobs[j] == pytest.approx(float(score.detach()), rel=1e-5)
        stretched = F.interpolate(F.interpolate(cam[None, None], size=(SIZE, SIZE), mode="bilinear"),
                                  size=(40, 60), mode="bilinear")[0, 0]
        torch.testing.assert_close(result.maps[j], stretched, rtol=1e-3, atol=1e-3 * float(cam.max()) + 1e-7)


def test_batched_equals_looped(cap):
    batched_equals_looped(cap, IMAGE, CAPTION, "gradcam,hirescam")  # also in chunks of two words
    other = Image.fromarray((np.random.default_rng(1).random((50, 30, 3)) * 255).astype("uint8"))
    batch_equals_alone(cap, [IMAGE, other], [CAPTION, "a red circle"], "gradcam,hirescam")  # captions of two lengths, padded


def test_every_cam_method_and_the_model_left_as_it_was(cap):
    before = snapshot(cap.model)
    result = cap.explain(IMAGE, CAPTION, method="all")
    after = snapshot(cap.model)
    assert [t for _, t in before["training"]] == [t for _, t in after["training"]]
    assert [h for _, h in before["hooks"]] == [h for _, h in after["hooks"]]
    assert [(r, g) for _, r, g in before["params"]] == [(r, g) for _, r, g in after["params"]]
    assert "gradcam" in result.methods and "relevance" not in result.methods
    for name in result.methods:
        assert result.for_method(name).maps.shape == (7, 40, 60)
        assert torch.isfinite(result.for_method(name).maps).all()


@pytest.mark.parametrize("method", ["attention-gradcam", "relevance", "tam"])
def test_attention_methods_and_tam_refused_by_name(cap, method):
    with pytest.raises(ValueError, match=method):
        cap.explain(IMAGE, CAPTION, method=method)


@pytest.mark.parametrize("where", ["qformer", "language model"])
def test_layers_without_a_grid_are_refused(cap, answerer, where):
    opt = cap.family == "blip2"  # the tiny BLIP-2 has an OPT decoder, the tiny InstructBLIP a Llama one
    layer = ("qformer.encoder.layer.0" if where == "qformer" else
             "language_model.model.decoder.layers.0" if opt else "language_model.model.layers.0")
    with pytest.raises(ValueError, match="no spatial layout"):
        cap.explain(IMAGE, CAPTION, layer=layer)
    with pytest.raises(ValueError, match="no spatial layout"):
        answerer.explain(IMAGE, QUESTION, answer="red", layer=layer)
    other = cap.explain(IMAGE, CAPTION, layer="vision_model.encoder.layers.0")  # any vision block
    assert other.layer_maps.shape == (7, *GRID)


def test_generation(cap):
    cap.vlm.language_model.generation_config.suppress_tokens = cap.vlm.generation_config.suppress_tokens
    caption = cap.generate(IMAGE, max_words=3)
    assert caption and caption == cap.generate_batch([IMAGE])[0][:len(caption)]


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
    prompt = answerer.question_prompt.format(question=QUESTION)
    start = answerer.chat(images=IMAGE, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    full = _by_hand_inputs(answerer, prompt, "two circles")
    with torch.no_grad():
        logits = answerer.vlm(**full).logits[0].float()
    ids = full["input_ids"][0]
    expected = sum(float(torch.log_softmax(logits[p - 1], -1)[ids[p]]) for p in range(start, len(ids)))
    assert len(ids) - start >= 2 and together.scores[1] == pytest.approx(expected, rel=1e-4)


def test_vqa_gradcam_by_brute_force(answerer):
    """The vision layer runs once for the image: answer k's Grad-CAM is the gradient of its summed
    token log-probs in a forward of the question and that answer alone."""
    result = answerer.explain(IMAGE, QUESTION, answer=["red", "two circles"], method="gradcam")
    prompt = answerer.question_prompt.format(question=QUESTION)
    start = answerer.chat(images=IMAGE, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    for k, answer in enumerate(["red", "two circles"]):
        full = _by_hand_inputs(answerer, prompt, answer)
        logits, activation = hooked_forward(answerer.vlm, answerer.default_layer, full)
        ids = full["input_ids"][0]
        logprobs = torch.log_softmax(logits[0].float(), -1)
        score = sum(logprobs[p - 1, ids[p]] for p in range(start, len(ids)))
        gradient, = torch.autograd.grad(score, activation)
        cam = torch.relu(activation[0, 1:].detach() @ gradient[0, 1:].mean(dim=0)).reshape(GRID)
        torch.testing.assert_close(result.layer_maps[k], cam, rtol=1e-4, atol=1e-6)


def test_vqa_methods_batched_equal_looped(answerer):
    answers = ["red", "two circles"]
    together = answerer.explain(IMAGE, QUESTION, answer=answers, method="gradcam,layercam")
    for k, answer in enumerate(answers):
        alone = answerer.explain(IMAGE, QUESTION, answer=answer, method="gradcam,layercam")
        for name in together.methods:
            torch.testing.assert_close(alone.for_method(name).map, together.for_method(name).maps[k],
                                       rtol=1e-4, atol=1e-6)


def test_vqa_top_answer_from_generation(answerer):
    answerer.vlm.language_model.generation_config.suppress_tokens = answerer.vlm.generation_config.suppress_tokens
    top = answerer.answer(IMAGE, QUESTION, top_k=3)
    assert 1 <= len(top) <= 3 and top == sorted(top, key=lambda a: -a[1])


# ----------------------------------------------------------------------------- CLI
def test_cli_caption_and_vqa(saved, tmp_path):
    IMAGE.save(tmp_path / "img.png")
    from mmgradcam.cli import main

    def run(*args):  # the command in this process (one interpreter start-up less per call); paths under tmp_path
        paths = {"img.png": str(tmp_path / "img.png"), "out": str(tmp_path / "out"), "qa": str(tmp_path / "qa")}
        return main([paths.get(a, a) for a in args])
    result = run("caption", "img.png", "--model", str(saved[1]), "--prompt", "a photo of", "--caption", CAPTION,
                 "--out", "out")
    assert result == 0
    assert np.load(tmp_path / "out" / "maps.npz")["maps"].shape == (7, 40, 60)
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["prompt"] == "a photo of" and summary["caption"] == CAPTION
    result = run("vqa", "img.png", QUESTION, "--model", str(saved[1]), "--answer", "red", "--out", "qa")
    assert result == 0
