"""Florence-2 on a tiny random-weight config (a 2-stage DaViT with an 8x8 last stage, the projector's
pooled token before the grid, a 2+2-layer BART, an in-memory BPE tokenizer with BART's special tokens
and Florence-2's task tokens, the real Florence2Processor with a square resize), saved with
save_pretrained and loaded by path: the encoder prompt from the task token, the caption as the
decoder's output, word maps at the image size stretched back from the square input, Grad-CAM by
brute force at the DaViT's last block and at a BART encoder layer, batched equal to looped, the
decoder's layers and TAM refused, generative VQA, the CLI and eval."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmgradcam.engine.state import snapshot
from mmgradcam.tasks import captioning, vqa
from mmgradcam.tasks.hf import eager_attention
from chat_checks import batch_equals_alone, batched_equals_looped, explain_leaving_the_model, hooked_forward
from hf_tiny import save_tiny, tiny_florence2

CAPTION = "two circles, a triangle above the squares"
WORDS = ["two", "circles", "a", "triangle", "above", "the", "squares"]
QUESTION = "what color is the circle ?"
# 40x60: the processor resizes to 64x64 without keeping the aspect ratio
IMAGE = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8"))
GRID = (8, 8)  # 64 px through the patch embeddings' strides 4 and 2
PRESET = "model.vision_tower.blocks.1.1"  # the last stage's last block (stage 0 has more blocks)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("florence2") / "tiny-florence2", tiny_florence2())


@pytest.fixture(scope="module")
def cap(saved):
    return captioning.load(str(saved))


@pytest.fixture(scope="module")
def answerer(saved):
    return vqa.load(str(saved))


def _by_hand(adapter, prompt: str, reply: str, image=IMAGE) -> dict:
    """Florence-2's layout written out: the processor's encoder inputs for ``prompt`` and the
    decoder reading ``</s> <s> reply </s>`` (the tokenizer adds <s> and </s>)."""
    inputs = dict(adapter.chat(images=image, text=prompt, return_tensors="pt"))
    start = adapter.vlm.config.text_config.decoder_start_token_id
    inputs["decoder_input_ids"] = torch.tensor([[start] + adapter.tokenizer(reply)["input_ids"]])
    return inputs


def _gradcam(activation, gradient):
    """Grad-CAM of a (C, h, w) map: ReLU(sum_c mean-gradient_c * activation_c)."""
    return torch.relu((gradient.mean(dim=(1, 2))[:, None, None] * activation.detach()).sum(dim=0))


def test_loaded_by_path_with_the_last_stages_last_block(cap, answerer):
    assert cap.family == answerer.family == "florence2"
    assert type(cap).__name__ == "Florence2Captioner" and type(answerer).__name__ == "Florence2VQA"
    assert cap.default_layer == answerer.default_layer == PRESET and "DaViT" in cap.layer_reason
    assert cap.vision_grid() == GRID and cap.prompt == "<CAPTION>"
    # the encoder's sequence: 1 + 64 image tokens (pooled, then the grid), <s>, the task's text prompt, </s>
    ids = cap.prompt_ids("<CAPTION>")
    assert ids[:65] == [cap.image_token_id] * 65 and cap.image_token_id not in ids[65:]
    assert cap.tokenizer.decode(ids[65:]) == "<s>What does the image describe?</s>"
    assert cap.image_columns({"input_ids": torch.tensor([ids])}) == slice(1, 65)


def test_the_caption_is_the_decoders_output(cap):
    tokens = cap.tokenize(CAPTION)
    inputs = cap.batch_inputs(cap.preprocess(IMAGE)[0]["pixel_values"], [tokens])
    by_hand = _by_hand(cap, "<CAPTION>", CAPTION)
    for key in ("input_ids", "decoder_input_ids", "pixel_values"):
        assert torch.equal(inputs[key], by_hand[key]), key
    ids = tokens.input_ids[0]
    assert ids[:2].tolist() == [2, 0]  # the decoder's start, then <s>
    assert tokens.words == WORDS and max(len(p) for p in tokens.word_positions) >= 2  # merged subwords
    for positions in tokens.word_positions:
        assert all(ids[p + 1] == t for p, t in positions)  # the logit before a token predicts it


def test_word_maps_stretched_back_and_scored_by_hand(cap):
    result = cap.explain(IMAGE, CAPTION)
    assert result.words == WORDS and result.maps.shape == (7, 40, 60) and result.layer_maps.shape == (7, *GRID)
    assert torch.count_nonzero(result.layer_maps) > 0 and result.seen.all()  # a stretch: every pixel seen
    geometry = cap.processor.geometry((40, 60))
    assert geometry.scale == pytest.approx((40 / 64, 60 / 64), rel=1e-3) and geometry.offset == pytest.approx((0, 0), abs=1e-2)
    torch.testing.assert_close(result.maps, geometry.invert(result.layer_maps))
    with torch.no_grad():
        logits = cap.vlm(**_by_hand(cap, "<CAPTION>", CAPTION)).logits
    logprobs = torch.log_softmax(logits[0].float(), -1)
    for positions, score in zip(cap.tokenize(CAPTION).word_positions, result.word_logprobs):
        assert score == pytest.approx(float(sum(logprobs[p, t] for p, t in positions)), rel=1e-4, abs=1e-5)


def test_a_change_in_one_corner_stays_over_that_corner(cap):
    """The first stage's patch embedding is local: a change in the image's top-right corner (10x15
    px of 40x60) changes only its cells over that corner (rows, then columns: no transposition),
    and those cells map back onto that corner of the image."""
    changed = np.array(IMAGE)
    changed[:10, -15:] = 255 - changed[:10, -15:]
    layer = "model.vision_tower.convs.0"
    maps = []
    for image in (IMAGE, Image.fromarray(changed)):
        inputs = _by_hand(cap, "<CAPTION>", CAPTION, image)
        with torch.no_grad():
            maps.append(hooked_forward(cap.vlm, layer, inputs)[1][0])
    moved = (maps[0] - maps[1]).abs().amax(dim=0) > 1e-5  # (16, 16) cells of 4 input px
    rows, cols = torch.nonzero(moved, as_tuple=True)
    # the corner is input rows 0..16, columns 48..64 (x1.6 and x1.07: stretched); the resize and
    # the 7x7 kernel reach a cell further
    assert moved.any() and int(rows.max()) <= 5 and int(cols.min()) >= 10
    back = cap.processor.geometry((40, 60)).invert(moved.float())
    ys, xs = torch.nonzero(back > 0, as_tuple=True)
    assert int(ys.max()) < 17 and int(xs.min()) > 33  # over the corner (rows 0..10, columns 45..60), a cell's margin


def test_gradcam_by_brute_force_at_the_davit_and_the_encoder(cap):
    """One forward and one backward per word, from a hook on the layer: at the DaViT's last block
    its (C, 8, 8) map; at a BART encoder layer its hidden states at the grid's positions (the pooled
    token at position 0 left out)."""
    inputs = _by_hand(cap, "<CAPTION>", CAPTION)
    tokens = cap.tokenize(CAPTION)
    for layer in (PRESET, "model.language_model.encoder.layers.1"):
        result = cap.explain(IMAGE, CAPTION, method="gradcam", layer=layer)
        for j, positions in enumerate(tokens.word_positions):
            logits, activation = hooked_forward(cap.vlm, layer, inputs)
            logprobs = torch.log_softmax(logits[0].float(), -1)
            score = sum(logprobs[p, t] for p, t in positions)
            gradient, = torch.autograd.grad(score, activation)
            if activation.dim() == 4:
                cam = _gradcam(activation[0], gradient[0])
            else:  # (1, L, C): positions 1..64 are the grid, row-major
                grid = lambda x: x[0, 1:65].T.reshape(-1, *GRID)  # noqa: E731
                cam = _gradcam(grid(activation), grid(gradient))
            torch.testing.assert_close(result.layer_maps[j], cam, rtol=1e-4, atol=1e-6)


def test_batched_equals_looped(cap):
    batched_equals_looped(cap, IMAGE, CAPTION, "gradcam,relevance")  # also in chunks of two words
    other = Image.fromarray((np.random.default_rng(1).random((50, 30, 3)) * 255).astype("uint8"))
    batch_equals_alone(cap, [IMAGE, other], [CAPTION, "a red circle"], "gradcam,relevance")  # captions of two lengths, padded


@pytest.mark.parametrize("method", ["all", "attention-gradcam", "relevance", "guided-gradcam"])
def test_every_method_and_the_model_left_as_it_was(cap, method):
    # "all": the CAM methods and the attention methods through the decoder
    result = explain_leaving_the_model(cap, IMAGE, CAPTION, method)
    assert len(result.words) == 7
    if method != "all":
        assert torch.count_nonzero(result.for_method(method).layer_maps) > 0


def test_attention_gradcam_by_hand(cap):
    """attention-gradcam: the last cross-attention's A * ReLU(dA), mean over heads, read at each
    word's decoder rows and the encoder's grid columns (1..64)."""
    result = cap.explain(IMAGE, CAPTION, method="attention-gradcam")
    inputs = _by_hand(cap, "<CAPTION>", CAPTION)
    attention = cap.vlm.get_submodule("model.language_model.decoder.layers.1.encoder_attn")
    positions = cap.tokenize(CAPTION).word_positions[3]
    captured = {}
    handle = attention.register_forward_hook(lambda m, a, o: captured.__setitem__("p", o[1]))
    try:
        with eager_attention(cap.vlm):  # the implementation that returns the probabilities
            output = cap.vlm(**inputs)
    finally:
        handle.remove()
    probs = captured["p"]
    score = sum(torch.log_softmax(output.logits[0].float(), -1)[p, t] for p, t in positions)
    gradient, = torch.autograd.grad(score, probs)
    weighted = (probs.detach() * gradient.clamp(min=0)).mean(dim=1)[0]  # (decoder rows, encoder positions)
    expected = torch.stack([weighted[p, 1:65] for p, _ in positions]).mean(dim=0).reshape(GRID)
    torch.testing.assert_close(result.layer_maps[3], torch.relu(expected), rtol=1e-4, atol=1e-7)


def test_decoder_layers_and_tam_are_refused_by_name(cap, answerer):
    for layer in ("model.language_model.decoder.layers.0", "lm_head"):
        with pytest.raises(ValueError, match="text decoder"):
            cap.explain(IMAGE, CAPTION, layer=layer)
        with pytest.raises(ValueError, match="text decoder"):
            answerer.explain(IMAGE, QUESTION, answer="red", layer=layer)
    with pytest.raises(ValueError, match="'tam' .*'florence2' family has none"):
        cap.explain(IMAGE, CAPTION, method="tam")
    with pytest.raises(ValueError, match="tam.*not available for VQA"):
        answerer.explain(IMAGE, QUESTION, answer="red", method="tam")


def test_prompts_and_generation(saved, cap):
    detailed = captioning.load(str(saved), prompt="<DETAILED_CAPTION>")
    ids = detailed.prompt_ids(detailed.prompt)
    assert detailed.tokenizer.decode(ids[65:]) == "<s>Describe in detail what is shown in the image.</s>"
    assert detailed.explain(IMAGE, CAPTION).word_logprobs != pytest.approx(cap.explain(IMAGE, CAPTION).word_logprobs)
    with pytest.raises(ValueError, match="should be the only content"):
        captioning.load(str(saved), prompt="<CAPTION> of the shapes")
    caption = cap.generate(IMAGE)
    with torch.no_grad():
        out = cap.vlm.generate(**dict(cap.chat(images=IMAGE, text="<CAPTION>", return_tensors="pt")),
                               max_new_tokens=cap.max_new_tokens, do_sample=False)
    assert out[0, :2].tolist() == [2, 0]  # the decoder's start, then the forced <s>
    assert caption == cap.tokenizer.decode(out[0], skip_special_tokens=True).strip() and caption
    assert cap.generate(IMAGE, max_words=2) == " ".join(caption.split()[:2])


def test_a_frozen_model_object_in_bf16_and_a_processor_of_another_image_token_count(cap):
    model, processor = tiny_florence2()  # the same seed: the weights saved for ``cap``
    model.requires_grad_(False)  # frozen for inference: the explained layer still gets its gradient
    frozen = captioning.load(model, processor).explain(IMAGE, CAPTION)
    torch.testing.assert_close(frozen.maps, cap.explain(IMAGE, CAPTION).maps)
    assert not any(p.requires_grad for p in model.parameters())
    half = captioning.load(model, processor, dtype="bfloat16").explain(IMAGE, CAPTION)  # autocast forwards
    for j in range(len(WORDS)):
        assert np.corrcoef(half.maps[j].flatten().numpy(), frozen.maps[j].flatten().numpy())[0, 1] > 0.95
    processor.num_image_tokens = 17
    with pytest.raises(ValueError, match="lays out 17 image tokens; the model makes 1 \\+ 8x8 = 65"):
        captioning.load(model, processor)


# ----------------------------------------------------------------------------- VQA
def test_vqa_answers_batched_and_scored_by_hand(answerer):
    answers = ["red", "two circles", "a blue square"]
    together = answerer.explain(IMAGE, QUESTION, answer=answers)
    assert together.answers == answers and together.maps.shape == (3, 40, 60)
    assert torch.count_nonzero(together.layer_maps) > 0
    for k, answer in enumerate(answers):
        # the question as the encoder's prompt; the answer as the decoder's output after </s> <s>
        full = _by_hand(answerer, QUESTION, answer)
        logits, activation = hooked_forward(answerer.vlm, PRESET, full)
        ids = full["decoder_input_ids"][0]
        logprobs = torch.log_softmax(logits[0].float(), -1)
        score = sum(logprobs[p - 1, ids[p]] for p in range(2, len(ids) - 1))  # </s> <s> not scored, nor the end
        assert together.scores[k] == pytest.approx(float(score.detach()), rel=1e-4)
        gradient, = torch.autograd.grad(score, activation)
        torch.testing.assert_close(together.layer_maps[k], _gradcam(activation[0], gradient[0]), rtol=1e-4, atol=1e-6)
        assert together.probabilities[k] == pytest.approx(float(np.exp(together.scores[k])), rel=1e-4)


@pytest.mark.parametrize("layer", [None, "model.language_model.encoder.layers.0"])
def test_vqa_methods_and_layers_batched_equal_looped(answerer, layer):
    answers = ["red", "two circles"]
    method = "gradcam,attention-gradcam,relevance"
    before = snapshot(answerer.vlm)
    together = answerer.explain(IMAGE, QUESTION, answer=answers, method=method, layer=layer)
    after = snapshot(answerer.vlm)
    assert [h for _, h in before["hooks"]] == [h for _, h in after["hooks"]]
    for k, answer in enumerate(answers):
        alone = answerer.explain(IMAGE, QUESTION, answer=answer, method=method, layer=layer)
        for name in together.methods:
            assert torch.count_nonzero(together.for_method(name).layer_maps[k]) > 0
            torch.testing.assert_close(alone.for_method(name).map, together.for_method(name).maps[k],
                                       rtol=1e-4, atol=1e-6)


def test_vqa_top_answer_from_generation(answerer):
    top = answerer.answer(IMAGE, QUESTION, top_k=3)
    assert 1 <= len(top) <= 3 and top == sorted(top, key=lambda a: -a[1])
    result = answerer.explain(IMAGE, QUESTION)
    assert result.answer == top[0][0] and result.probabilities[0] == pytest.approx(top[0][1], rel=1e-4)


# ----------------------------------------------------------------------------- CLI and eval
def test_cli_caption_and_vqa(saved, tmp_path):
    IMAGE.save(tmp_path / "img.png")
    from mmgradcam.cli import main

    assert main(["caption", str(tmp_path / "img.png"), "--model", str(saved), "--prompt", "<DETAILED_CAPTION>",
                 "--caption", CAPTION, "--out", str(tmp_path / "out")]) == 0
    assert np.load(tmp_path / "out" / "maps.npz")["maps"].shape == (7, 40, 60)
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["prompt"] == "<DETAILED_CAPTION>" and summary["caption"] == CAPTION
    expected = captioning.load(str(saved), prompt="<DETAILED_CAPTION>").explain(IMAGE, CAPTION).word_logprobs
    assert [w["logprob"] for w in summary["words"]] == pytest.approx(expected, rel=1e-4)
    assert main(["vqa", str(tmp_path / "img.png"), QUESTION, "--model", str(saved), "--answer", "red",
                 "--out", str(tmp_path / "qa")]) == 0
    assert np.load(tmp_path / "qa" / "maps.npz")["maps"].shape[-2:] == (40, 60)


def test_eval(saved, tmp_path):
    from mmgradcam.cli import main
    from mmgradcam.data.shapes import write_split

    paths = write_split(tmp_path / "data", "test", 2, seed=1)
    assert main(["eval", "--instances", str(paths["instances"]), "--captions", str(paths["captions"]),
                 "--images", str(paths["images"]), "--references", "--model", str(saved),
                 "--method", "gradcam,relevance", "--workers", "0", "--quiet", "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["images"] == 2 and summary["config"]["prompt"] is None
