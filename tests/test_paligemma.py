"""PaliGemma on a tiny random-weight config (SigLIP tower without CLS, Gemma decoder, in-memory BPE
tokenizer with Gemma's BOS, the real PaliGemmaProcessor and SiglipImageProcessor), saved with
save_pretrained and loaded by path: the task-prefix layout (no chat template), the prefix/suffix
token types, word maps at the image size of a non-square image stretched back from the square
input, Grad-CAM by brute force, batched equal to looped, VQA with several answers."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmgradcam.tasks import captioning, vqa
from chat_checks import batch_equals_alone, batched_equals_looped, explain_leaving_the_model, hooked_forward
from hf_tiny import tiny_paligemma, save_tiny

CAPTION = "two circles, a triangle above the squares"
WORDS = ["two", "circles", "a", "triangle", "above", "the", "squares"]
QUESTION = "what color is the circle ?"
# 40x60: SigLIP's processor resizes to 84x84 without keeping the aspect ratio (x2.1 down, x1.4 across)
IMAGE = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8"))
SIZE, GRID = 84, (6, 6)  # 84 px / patch 14, one image token per patch, no CLS


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("paligemma") / "tiny-paligemma", tiny_paligemma(image_size=SIZE))


@pytest.fixture(scope="module")
def cap(saved):
    return captioning.load(str(saved))


@pytest.fixture(scope="module")
def answerer(saved):
    return vqa.load(str(saved))


def _by_hand_inputs(adapter, prefix: str, suffix: str, image=IMAGE) -> dict:
    """PaliGemma's own layout through its processor: image tokens, BOS, the prefix, "\\n", then the
    suffix (its EOS dropped: it is not scored) with token_type_ids 1."""
    out = dict(adapter.chat(images=image, text="<image>" + prefix, suffix=suffix, return_tensors="pt"))
    out.pop("labels")
    return {k: v[:, :-1] if k != "pixel_values" else v for k, v in out.items()}


def test_loaded_by_path_with_the_preset_layer(cap, answerer):
    assert cap.family == answerer.family == "paligemma"
    assert type(cap).__name__ == "PaliGemmaCaptioner" and type(answerer).__name__ == "PaliGemmaVQA"
    assert cap.chat.chat_template is None  # no chat template: the task prefix is the prompt
    # the SigLIP tower's last block: the projector reads its tokens after the post-layernorm
    assert cap.default_layer == answerer.default_layer == "model.vision_tower.encoder.layers.1"
    assert "projector" in cap.layer_reason
    assert cap.vision_grid() == cap.image_token_grid() == GRID
    assert cap.prompt == "caption en" and answerer.question_prompt == "answer en {question}"


def test_the_caption_is_the_suffix_after_the_task_prefix(cap):
    tokens = cap.tokenize(CAPTION)
    by_hand = _by_hand_inputs(cap, "caption en", CAPTION)
    assert tokens.input_ids.tolist() == by_hand["input_ids"].tolist()
    # prefix (image tokens, BOS, "caption en\n") bidirectional, caption causal: the processor's token types
    assert tokens.extra_inputs["token_type_ids"].tolist() == by_hand["token_type_ids"].tolist()
    ids = tokens.input_ids[0].tolist()
    count = GRID[0] * GRID[1]
    assert ids[:count] == [cap.image_token_id] * count and ids[count] == cap.tokenizer.bos_token_id
    assert cap.tokenizer.decode(ids[count + 1:]).startswith("caption en\n")
    for positions in tokens.word_positions:
        assert all(ids[p + 1] == t for p, t in positions)  # the logit before a token predicts it
    assert tokens.words == WORDS
    assert max(len(p) for p in tokens.word_positions) >= 2  # words merged from subword tokens


def test_the_suffix_is_causal(cap):
    """With the suffix's token types a word's score does not depend on the words after it (without
    them PaliGemma's decoder attends both ways over the whole sequence)."""
    a = cap.explain(IMAGE, "a red circle to the left of a blue square", method="gradcam")
    b = cap.explain(IMAGE, "a red circle to the left of a green star", method="gradcam")
    assert a.word_logprobs[:8] == pytest.approx(b.word_logprobs[:8], rel=1e-5)
    torch.testing.assert_close(a.layer_maps[:8], b.layer_maps[:8], rtol=1e-4, atol=1e-6)
    inputs = _by_hand_inputs(cap, "caption en", "a red circle")
    inputs.pop("token_type_ids")
    with torch.no_grad():
        both_ways = cap.model(**inputs).logits
        other = dict(inputs, input_ids=inputs["input_ids"].clone())
        other["input_ids"][0, -1] += 1  # another last token
        changed = cap.model(**other).logits
    assert not torch.allclose(both_ways[0, -3], changed[0, -3])  # what the token types prevent


def test_the_stretch_a_patch_lands_where_it_was_in_the_image(cap):
    """SigLIP's square resize, measured and inverted: change the original pixels inside the cell of
    patch (0, 5) (top right: rows 0..6.7, columns 50..60 of the 40x60 image); only that patch's
    embedding changes, and the toolkit's geometry lays it back over that cell of the image."""
    geometry = cap.processor.geometry((40, 60))
    assert geometry.scale == pytest.approx((40 / SIZE, 60 / SIZE), rel=1e-3)
    assert geometry.offset == pytest.approx((0.0, 0.0), abs=1e-2) and bool(geometry.seen().all())
    changed = np.asarray(IMAGE).copy()
    changed[1:5, 52:58] = 255 - changed[1:5, 52:58]
    embeddings = "model.vision_tower.embeddings"
    tokens = []
    for image in (IMAGE, Image.fromarray(changed)):
        pixels = cap.chat.image_processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            tokens.append(hooked_forward(cap.model, embeddings, {"input_ids": cap.tokenize(CAPTION).input_ids,
                                                                      "pixel_values": pixels})[1])
    moved = (tokens[1] - tokens[0]).norm(dim=-1)[0].reshape(GRID)  # patch k is grid cell (k // 6, k % 6)
    assert float(moved[0, 5]) > 0 and float(moved.sum() - moved[0, 5]) == 0
    back = geometry.invert(moved)
    assert back.shape == (40, 60)
    rows, cols = torch.nonzero(back > 0.5 * back.max(), as_tuple=True)
    assert int(rows.max()) < 7 and int(cols.min()) >= 49  # the cell's rows 0..6.7 and columns 50..60


def test_gradcam_by_brute_force_and_the_maps_stretched_back(cap):
    """One forward and one backward per word, Grad-CAM from a hook on the preset layer:
    ReLU(sum_c mean-gradient_c * activation_c) over the 6x6 patch grid (no CLS to drop); the maps at
    the image size are it resized to the 84x84 input, then to 40x60 (each axis on its own)."""
    result = cap.explain(IMAGE, CAPTION, method="gradcam")
    assert result.maps.shape == (7, 40, 60) and result.layer_maps.shape == (7, *GRID)
    assert bool(result.seen.all())  # a stretch, not a crop: every pixel is seen
    tokens = cap.tokenize(CAPTION)
    inputs = _by_hand_inputs(cap, "caption en", CAPTION)
    for j, positions in enumerate(tokens.word_positions):
        logits, activation = hooked_forward(cap.model, cap.default_layer, inputs)
        logprobs = torch.log_softmax(logits[0].float(), -1)
        score = sum(logprobs[p, t] for p, t in positions)
        gradient, = torch.autograd.grad(score, activation)
        acts, grads = activation[0].detach(), gradient[0]  # (36, C)
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


@pytest.mark.parametrize("method", ["all", "tam", "attention-gradcam", "relevance", "guided-gradcam"])
def test_every_method_and_the_model_left_as_it_was(cap, method):
    result = explain_leaving_the_model(cap, IMAGE, CAPTION, method)
    assert len(result.words) == 7
    if method != "all":
        assert torch.count_nonzero(result.for_method(method).layer_maps) > 0


def test_a_layer_of_the_language_model_reads_the_image_tokens(cap):
    layer = "model.language_model.layers.0"
    result = cap.explain(IMAGE, CAPTION, layer=layer)
    assert result.layer_maps.shape == (7, *GRID) and torch.count_nonzero(result.layer_maps) > 0
    tokens = cap.tokenize(CAPTION)
    inputs = _by_hand_inputs(cap, "caption en", CAPTION)
    image = (inputs["input_ids"][0] == cap.image_token_id).nonzero().flatten()
    logits, hidden = hooked_forward(cap.model, layer, inputs)
    score = sum(torch.log_softmax(logits[0].float(), -1)[p, t] for p, t in tokens.word_positions[3])
    gradient, = torch.autograd.grad(score, hidden)
    cam = torch.relu(hidden[0, image].detach() @ gradient[0, image].mean(dim=0)).reshape(GRID)
    torch.testing.assert_close(result.layer_maps[3], cam, rtol=1e-4, atol=1e-6)


def test_prompt_and_generation(saved):
    spanish = captioning.load(str(saved), prompt="caption es")
    assert spanish.prompt_text(spanish.prompt) == "<image>caption es"
    assert spanish.tokenize(CAPTION).input_ids.tolist() == _by_hand_inputs(spanish, "caption es", CAPTION)[
        "input_ids"].tolist()
    caption = spanish.generate(IMAGE, max_words=3)
    assert caption == spanish.generate_batch([IMAGE])[0][:len(caption)]
    # generation continues the prefix with suffix token types (the processor's own generate inputs)
    inputs = dict(spanish.chat(images=IMAGE, text="<image>caption es", return_tensors="pt"))
    inputs.pop("labels")
    with torch.no_grad():
        ids = spanish.model.generate(**inputs, max_new_tokens=spanish.max_new_tokens, do_sample=False)
    expected = spanish.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert spanish.generate(IMAGE) == expected


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
    # by hand: "answer en {question}" as the prefix, the answer as the suffix, one forward
    full = _by_hand_inputs(answerer, f"answer en {QUESTION}", "two circles")
    with torch.no_grad():
        logits = answerer.vlm(**full).logits[0].float()
    start = int((full["token_type_ids"][0] == 0).sum())
    ids = full["input_ids"][0]
    expected = sum(float(torch.log_softmax(logits[p - 1], -1)[ids[p]]) for p in range(start, len(ids)))
    assert len(ids) - start >= 2 and together.scores[1] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("layer", [None, "model.language_model.layers.0"])
def test_vqa_methods_and_layers_batched_equal_looped(answerer, layer):
    answers = ["red", "two circles"]
    method = "gradcam,attention-gradcam,relevance"
    together = answerer.explain(IMAGE, QUESTION, answer=answers, method=method, layer=layer)
    for k, answer in enumerate(answers):
        alone = answerer.explain(IMAGE, QUESTION, answer=answer, method=method, layer=layer)
        for name in together.methods:
            torch.testing.assert_close(alone.for_method(name).map, together.for_method(name).maps[k],
                                       rtol=1e-4, atol=1e-6)


def test_vqa_top_answer_from_generation(answerer):
    top = answerer.answer(IMAGE, QUESTION, top_k=5)  # explain ranks the candidates of a 5-beam search
    assert 1 <= len(top) <= 5 and top == sorted(top, key=lambda a: -a[1])
    result = answerer.explain(IMAGE, QUESTION)
    assert result.answer == top[0][0] and result.maps.shape == (1, 40, 60)


# ----------------------------------------------------------------------------- CLI
def test_cli_caption_and_vqa(saved, tmp_path):
    IMAGE.save(tmp_path / "img.png")
    from mmgradcam.cli import main

    def run(*args):  # the command in this process (one interpreter start-up less per call); paths under tmp_path
        paths = {"img.png": str(tmp_path / "img.png"), "out": str(tmp_path / "out"), "qa": str(tmp_path / "qa")}
        return main([paths.get(a, a) for a in args])
    result = run("caption", "img.png", "--model", str(saved), "--prompt", "caption es", "--caption", CAPTION,
                 "--out", "out")
    assert result == 0
    assert np.load(tmp_path / "out" / "maps.npz")["maps"].shape == (7, 40, 60)
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["prompt"] == "caption es" and summary["caption"] == CAPTION
    result = run("vqa", "img.png", QUESTION, "--model", str(saved), "--answer", "red", "--out", "qa")
    assert result == 0
