"""Gemma 3 on a tiny random-weight config (SigLIP tower with an 8x8 patch grid, the projector's 2x2
average pooling to 16 soft tokens, a Gemma 3 decoder with a sliding and a full attention layer,
in-memory BPE tokenizer with Gemma 3's chat template, turn and image tokens, the real
Gemma3Processor and Gemma3ImageProcessor), saved with save_pretrained and loaded by path: the
chat layout and image-token types, the patch grid and the pooled grid on a non-square image
stretched back, Grad-CAM by hand at a vision and a language-model layer, batched equal to looped,
VQA with several answers, pan-and-scan refused."""
import numpy as np
import pytest
import torch
from PIL import Image

from mmgradcam.tasks import captioning, vqa
from chat_checks import batch_equals_alone, batched_equals_looped, explain_leaving_the_model, hooked_forward
from hf_tiny import tiny_gemma3, save_tiny

CAPTION = "two circles, a triangle above the squares"
WORDS = ["two", "circles", "a", "triangle", "above", "the", "squares"]
QUESTION = "what color is the circle ?"
PROMPT = "Describe the image."
# 40x60: Gemma3ImageProcessor resizes to 112x112 without keeping the aspect ratio
IMAGE = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8"))
SIZE, PATCHES, TOKENS = 112, (8, 8), (4, 4)  # 112 px / patch 14; 16 soft tokens = the 8x8 grid pooled 2x2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3", tiny_gemma3(image_size=SIZE))


@pytest.fixture(scope="module")
def cap(saved):
    return captioning.load(str(saved))


@pytest.fixture(scope="module")
def answerer(saved):
    return vqa.load(str(saved))


def _chat(user: str, reply: str = "") -> str:
    """Gemma 3's chat written out by hand: BOS, the user turn (image, text), the model turn."""
    return f"<bos><start_of_turn>user\n<start_of_image>{user}<end_of_turn>\n<start_of_turn>model\n{reply}"


def _by_hand_inputs(adapter, user: str, reply: str, image=IMAGE) -> dict:
    return dict(adapter.chat(images=image, text=_chat(user, reply), return_tensors="pt", add_special_tokens=False))


def test_loaded_by_path_with_the_preset_layer(cap, answerer):
    assert cap.family == answerer.family == "gemma3"
    assert type(cap).__name__ == "Gemma3Captioner" and type(answerer).__name__ == "Gemma3VQA"
    assert cap.default_layer == answerer.default_layer == "model.vision_tower.encoder.layers.1"
    assert "pools" in cap.layer_reason
    assert cap.vision_grid() == PATCHES and cap.image_token_grid() == TOKENS
    assert cap.prompt_text(PROMPT) == _chat(PROMPT)


def test_the_caption_is_the_models_reply(cap):
    tokens = cap.tokenize(CAPTION)
    by_hand = _by_hand_inputs(cap, PROMPT, CAPTION)
    assert tokens.input_ids.tolist() == by_hand["input_ids"].tolist()
    # the image tokens attend to each other both ways: token type 1 there, as the processor says
    assert tokens.extra_inputs["token_type_ids"].tolist() == by_hand["token_type_ids"].tolist()
    ids = tokens.input_ids[0].tolist()
    tok = cap.tokenizer
    image = [i for i, t in enumerate(ids) if t == cap.image_token_id]
    assert len(image) == 16 and image == list(range(image[0], image[0] + 16))
    assert ids[image[0] - 1] == tok.boi_token_id and ids[image[-1] + 1] == tok.eoi_token_id  # bracketed
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS, only once
    for positions in tokens.word_positions:
        assert all(ids[p + 1] == t for p, t in positions)
    assert tokens.words == WORDS
    assert max(len(p) for p in tokens.word_positions) >= 2  # words merged from subword tokens


def test_the_stretch_the_patch_grid_and_the_pooled_grid(cap):
    """Change the original pixels inside patch (0, 7)'s cell (rows 0..5, columns 52.5..60 of the
    40x60 image): only that patch's embedding changes. The projector pools patch (r, c) into soft
    token (r // 2, c // 2): fed that patch alone, only soft token (0, 3) moves. The geometry lays
    each grid back over its cell of the image (stretched: 112 px square from 40x60)."""
    geometry = cap.processor.geometry((40, 60))
    assert geometry.scale == pytest.approx((40 / SIZE, 60 / SIZE), rel=1e-3) and bool(geometry.seen().all())
    changed = np.asarray(IMAGE).copy()
    changed[1:4, 54:59] = 255 - changed[1:4, 54:59]
    patches = []
    for image in (IMAGE, Image.fromarray(changed)):
        pixels = cap.chat.image_processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            patches.append(cap.model.model.vision_tower.embeddings(pixels))
    moved = (patches[1] - patches[0]).norm(dim=-1)[0].reshape(PATCHES)
    assert float(moved[0, 7]) > 0 and float(moved.sum() - moved[0, 7]) == 0
    projector = cap.model.model.multi_modal_projector
    one = torch.zeros(1, PATCHES[0] * PATCHES[1], cap.model.config.vision_config.hidden_size)
    one[0, 7] = torch.randn(one.shape[-1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moved_soft = projector(one).norm(dim=-1)[0].reshape(TOKENS)
    assert float(moved_soft[0, 3]) > 0 and float(moved_soft.sum() - moved_soft[0, 3]) == 0
    for grid, (last_row, first_col) in ((moved, (6, 51)), (moved_soft, (11, 44))):
        back = geometry.invert(grid)
        rows, cols = torch.nonzero(back > 0.5 * back.max(), as_tuple=True)
        assert back.shape == (40, 60) and int(rows.max()) < last_row and int(cols.min()) >= first_col
    # the projector's output is nameable too: its 16 tokens on the pooled grid
    assert cap.explain(IMAGE, "a red circle", layer="model.multi_modal_projector").layer_maps.shape == (3, *TOKENS)


def test_word_maps_and_gradcam_by_hand_at_both_grids(cap):
    """The preset (vision) layer on the 8x8 patch grid and a decoder layer at the 16 image tokens on
    the 4x4 pooled grid, each checked against one forward and backward by hand."""
    tokens = cap.tokenize(CAPTION)
    inputs = _by_hand_inputs(cap, PROMPT, CAPTION)
    image = (inputs["input_ids"][0] == cap.image_token_id).nonzero().flatten()
    for layer, grid in ((None, PATCHES), ("model.language_model.layers.0", TOKENS)):
        result = cap.explain(IMAGE, CAPTION, method="gradcam", layer=layer)
        assert result.maps.shape == (7, 40, 60) and result.layer_maps.shape == (7, *grid)
        assert bool(result.seen.all()) and torch.count_nonzero(result.layer_maps) > 0
        for j in (1, 3):
            logits, hidden = hooked_forward(cap.model, layer or cap.default_layer, inputs)
            logprobs = torch.log_softmax(logits[0].float(), -1)
            score = sum(logprobs[p, t] for p, t in tokens.word_positions[j])
            gradient, = torch.autograd.grad(score, hidden)
            acts, grads = (hidden[0], gradient[0]) if layer is None else (hidden[0, image], gradient[0, image])
            cam = torch.relu(acts.detach() @ grads.mean(dim=0)).reshape(grid)
            torch.testing.assert_close(result.layer_maps[j], cam, rtol=1e-4, atol=1e-6)
            assert result.word_logprobs[j] == pytest.approx(float(score.detach()), rel=1e-5)


def test_batched_equals_looped(cap):
    batched_equals_looped(cap, IMAGE, CAPTION, "gradcam,hirescam")  # also in chunks of two words
    other = Image.fromarray((np.random.default_rng(1).random((50, 30, 3)) * 255).astype("uint8"))
    batch_equals_alone(cap, [IMAGE, other], [CAPTION, "a red circle"], "gradcam,hirescam")  # captions of two lengths, padded


@pytest.mark.parametrize("method", ["all", "tam", "relevance"])
def test_methods_and_the_model_left_as_it_was(cap, method):
    result = explain_leaving_the_model(cap, IMAGE, CAPTION, method)
    assert len(result.words) == 7
    if method != "all":  # the LM head or the attention at the image tokens: the pooled grid
        assert result.layer_maps.shape == (7, *TOKENS) and torch.count_nonzero(result.layer_maps) > 0


def test_generation_and_pan_and_scan_refused(saved):
    cap = captioning.load(str(saved), prompt="What is in the picture?")
    caption = cap.generate(IMAGE, max_words=3)
    assert caption == cap.generate_batch([IMAGE])[0][:len(caption)]
    model, processor = tiny_gemma3(image_size=SIZE)
    processor.image_processor.do_pan_and_scan = True
    with pytest.raises(ValueError, match="pan-and-scan"):
        captioning.load(model, processor)


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
    question = _by_hand_inputs(answerer, QUESTION, "")
    full = _by_hand_inputs(answerer, QUESTION, "two circles")
    with torch.no_grad():
        logits = answerer.vlm(**full).logits[0].float()
    start, ids = question["input_ids"].shape[1], full["input_ids"][0]
    expected = sum(float(torch.log_softmax(logits[p - 1], -1)[ids[p]]) for p in range(start, len(ids)))
    assert len(ids) - start >= 2 and together.scores[1] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("layer", [None, "model.language_model.layers.0"])
def test_vqa_methods_and_layers_batched_equal_looped(answerer, layer):
    answers = ["red", "two circles"]
    method = "gradcam,attention-gradcam"
    together = answerer.explain(IMAGE, QUESTION, answer=answers, method=method, layer=layer)
    grid = TOKENS if layer else PATCHES
    assert together.layer_maps.shape[-2:] == grid
    for k, answer in enumerate(answers):
        alone = answerer.explain(IMAGE, QUESTION, answer=answer, method=method, layer=layer)
        for name in together.methods:
            torch.testing.assert_close(alone.for_method(name).map, together.for_method(name).maps[k],
                                       rtol=1e-4, atol=1e-6)
    top = answerer.answer(IMAGE, QUESTION, top_k=2)
    assert 1 <= len(top) <= 2 and top == sorted(top, key=lambda a: -a[1])
