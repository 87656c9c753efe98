"""Qwen2-VL and Qwen2.5-VL on tiny random-weight configs (2-block vision tower with the 2x2 patch
merger, Qwen2.5-VL's window attention; 2-layer decoder with M-RoPE; in-memory BPE tokenizer with
Qwen's special tokens and chat template; the real processors with small min/max pixels), saved with
save_pretrained and loaded by path: the per-image prompt layout, word maps at the image size for two
aspect ratios (different grids), the packed vision tokens put back in raster order (the window order
of Qwen2.5-VL undone), Grad-CAM by hand, batched equal to looped, generative VQA, the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

import mmgradcam as mg
from mmgradcam.engine.layouts import FunctionLayout
from mmgradcam.tasks import captioning
from mmgradcam.tasks.qwen2_vl import unpatchify
from chat_checks import (answers_batched_equal_alone, batch_equals_alone, batched_equals_looped, cli_caption_and_vqa,
                         eval_run_with_a_prompt, explain_leaving_the_model, frozen_and_bf16, from_preprocessed_pixels,
                         hooked_forward, reply_logprob_by_hand, resized_with_nothing_cut)
from hf_tiny import tiny_qwen2_vl

VERSIONS = ["2", "2.5"]
CAPTION = "two circles, a triangle above the squares"
WORDS = ["two", "circles", "a", "triangle", "above", "the", "squares"]
QUESTION = "what color is the circle ?"
PROMPT = "Describe this image."
# smart_resize (multiples of 28 within 56x56..112x112 pixels): 60x90 -> 56x84, 90x60 -> 84x56
WIDE = Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype("uint8"))
TALL = Image.fromarray((np.random.default_rng(1).random((90, 60, 3)) * 255).astype("uint8"))
GRIDS = {"wide": (4, 6), "tall": (6, 4)}  # patches of 14 px; the language model's tokens: 2x3 and 3x2
# Qwen2.5-VL's window order on the wide image (windows of 56 px = 2x2 merge blocks over the 2x3
# merge blocks, padded to 2x2 windows): position j of the sequence holds raster merge block WINDOW[j]
WINDOW = [0, 1, 3, 4, 2, 5]
CLASSES = {"2": ("qwen2-vl", "Qwen2VLCaptioner", "Qwen2VLVQA"),
           "2.5": ("qwen2.5-vl", "Qwen2_5_VLCaptioner", "Qwen2_5_VLVQA")}


@pytest.fixture(scope="module", params=VERSIONS)
def version(request):
    return request.param


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for v in VERSIONS:
        path = tmp_path_factory.mktemp("qwen") / f"tiny-qwen{v}-vl"
        model, processor = tiny_qwen2_vl(v)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        paths[v] = path
    return paths


def _by_hand_inputs(adapter, image, reply: str = "", prompt: str = PROMPT) -> dict:
    """Qwen's chat written out by hand, through the processor (which expands <|image_pad|>)."""
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n{reply}")
    return dict(adapter.chat(images=image, text=text, return_tensors="pt"))


def _tokens(cap, image, caption=CAPTION):
    with cap.images_of(cap.image_grid(image)):
        return cap.tokenize(caption)


def _raster(tokens: torch.Tensor, grid: tuple[int, int], window: list[int] | None = None) -> torch.Tensor:
    """A vision layer's (h*w, C) tokens in merge-block order (each 2x2 block's patches consecutive;
    the blocks in ``window`` order when given) -> (h, w, C) in raster order, written out by hand."""
    h, w = grid
    blocks = tokens.reshape(h // 2 * (w // 2), 4, -1)
    if window is not None:
        ordered = torch.empty_like(blocks)
        ordered[window] = blocks  # position j holds raster block window[j]
        blocks = ordered
    return blocks.reshape(h // 2, w // 2, 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(h, w, -1)


# ----------------------------------------------------------------------------- loading and layout
def test_loaded_by_path_with_the_preset_layer(caps, answerers, version):
    cap, answerer = caps[version], answerers[version]
    family, cap_class, vqa_class = CLASSES[version]
    assert cap.family == answerer.family == family
    assert (type(cap).__name__, type(answerer).__name__) == (cap_class, vqa_class)
    assert cap.default_layer == answerer.default_layer == "model.visual.blocks.1"  # the block the merger reads
    assert "merger" in cap.layer_reason
    assert cap.prompt_text(PROMPT).endswith(
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n")


def test_the_caption_is_the_assistants_reply_laid_out_per_image(caps, version):
    cap = caps[version]
    for image, (h, w) in ((WIDE, GRIDS["wide"]), (TALL, GRIDS["tall"])):
        inputs, geometry = cap.prepare(image, CAPTION)
        by_hand = _by_hand_inputs(cap, image, CAPTION)
        for key in ("input_ids", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
            torch.testing.assert_close(inputs[key], by_hand[key])
        assert inputs["image_grid_thw"].tolist() == [[1, h, w]]
        assert int((inputs["input_ids"] == cap.image_token_id).sum()) == h * w // 4  # one token per 2x2 patches
        assert geometry.input_size == (h * 14, w * 14)
    tokens = _tokens(cap, WIDE)
    assert tokens.words == WORDS and max(len(p) for p in tokens.word_positions) >= 2  # subword tokens merged
    ids = tokens.input_ids[0]
    for positions in tokens.word_positions:
        assert all(ids[p + 1] == t for p, t in positions)  # the logit before a token predicts it
    with pytest.raises(ValueError, match="depend on the image"):
        cap.tokenize(CAPTION)  # outside a call that knows the image


def test_geometry_is_the_smart_resize_with_nothing_cut(caps):
    cap = caps["2"]
    resized_with_nothing_cut(cap.processor.geometry((60, 90)), (60, 90), (56, 84), rel=1e-3)
    # the flattened patches put back into the image: a 56x84 image is not resized
    exact = Image.fromarray((np.random.default_rng(2).random((56, 84, 3)) * 255).astype("uint8"))
    out = cap.chat.image_processor(images=exact, return_tensors="pt")
    image = unpatchify(out["pixel_values"], out["image_grid_thw"][0], 14, 2, 2)
    mean, std = (torch.tensor(v)[:, None, None] for v in cap.normalization)
    expected = torch.from_numpy(np.asarray(exact, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(image * std + mean, expected, atol=2e-3, rtol=0)


def test_packed_vision_tokens_back_in_raster_order(caps, version):
    """The input of the first vision block is the patch embedding in the tower's own order (merge
    blocks; Qwen2.5-VL: in window order). Embedded by hand from the image's patches in raster order,
    it must come out of the layout unchanged: the permutation is the model's, not assumed."""
    cap = caps[version]
    for image, (h, w) in ((WIDE, GRIDS["wide"]), (TALL, GRIDS["tall"])):
        inputs = _by_hand_inputs(cap, image)
        captured = {}
        block = cap.model.get_submodule("model.visual.blocks.0")
        handle = block.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
        try:
            with torch.no_grad():
                cap.model(**inputs)
        finally:
            handle.remove()
        pixels = unpatchify(inputs["pixel_values"], (1, h, w), 14, 2, 2)  # (3, 14h, 14w)
        patches = pixels.reshape(3, h, 14, w, 14).permute(1, 3, 0, 2, 4).reshape(h * w, 3, 1, 14, 14)
        flat = patches.expand(-1, -1, 2, -1, -1).reshape(h * w, -1)  # an image is two equal frames
        with torch.no_grad():
            raster = cap.model.get_submodule("model.visual.patch_embed")(flat).reshape(h, w, -1)
        with cap.images_of((1, h, w), "model.visual.blocks.0"):
            laid = cap.layer_options["layout"].to_bchw(captured["x"], lead=1)
        assert laid.shape == (1, raster.shape[-1], h, w)
        torch.testing.assert_close(laid[0], raster.permute(2, 0, 1), rtol=1e-4, atol=1e-5)
        if version == "2.5" and (h, w) == GRIDS["wide"]:  # the window order written out by hand
            torch.testing.assert_close(_raster(captured["x"], (h, w), WINDOW), raster, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(_raster(captured["x"], (h, w)), raster)  # it is not the plain order


# ----------------------------------------------------------------------------- captioning
def test_word_maps_at_the_image_size_for_two_aspect_ratios(caps, version):
    cap = caps[version]
    for image, grid in ((WIDE, GRIDS["wide"]), (TALL, GRIDS["tall"])):
        result = cap.explain(image, CAPTION)
        assert result.words == WORDS
        assert result.maps.shape == (7, image.height, image.width) and result.layer_maps.shape == (7, *grid)
        assert torch.count_nonzero(result.layer_maps) > 0 and bool(result.seen.all())
        tokens = _tokens(cap, image)
        with torch.no_grad():
            logits = cap.model(**_by_hand_inputs(cap, image, CAPTION)).logits
        logprobs = torch.log_softmax(logits[0].float(), -1)
        for positions, score in zip(tokens.word_positions, result.word_logprobs):
            assert score == pytest.approx(float(sum(logprobs[p, t] for p, t in positions)), rel=1e-4, abs=1e-5)
        merged = cap.explain(image, CAPTION, layer="model.visual.merger")  # a merged layer: (h/2) x (w/2)
        assert merged.layer_maps.shape == (7, grid[0] // 2, grid[1] // 2)


def test_gradcam_by_hand(caps, version):
    """One forward and one backward per word, Grad-CAM by hand from a hook on the preset layer:
    its (h*w, C) tokens put in raster order by hand (Qwen2.5-VL: the window order undone with the
    hand-written WINDOW), ReLU(sum_c mean-gradient_c * activation_c)."""
    cap = caps[version]
    grid = GRIDS["wide"]
    result = cap.explain(WIDE, CAPTION, method="gradcam")
    tokens = _tokens(cap, WIDE)
    inputs = _by_hand_inputs(cap, WIDE, CAPTION)
    window = WINDOW if version == "2.5" else None
    for j, positions in enumerate(tokens.word_positions):
        logits, activation = hooked_forward(cap.model, cap.default_layer, inputs)
        logprobs = torch.log_softmax(logits[0].float(), -1)
        score = sum(logprobs[p, t] for p, t in positions)
        gradient, = torch.autograd.grad(score, activation)
        acts, grads = _raster(activation.detach(), grid, window), _raster(gradient, grid, window)
        cam = torch.relu((acts * grads.mean(dim=(0, 1))).sum(-1))
        torch.testing.assert_close(result.layer_maps[j], cam, rtol=1e-4, atol=1e-6)
        assert result.word_logprobs[j] == pytest.approx(float(score.detach()), rel=1e-5)


def test_a_layer_of_the_language_model_reads_the_image_tokens(caps, version):
    cap = caps[version]
    layer = "model.language_model.layers.0"
    result = cap.explain(TALL, CAPTION, layer=layer)
    assert result.layer_maps.shape == (7, 3, 2) and result.maps.shape == (7, 90, 60)
    tokens = _tokens(cap, TALL)
    inputs = _by_hand_inputs(cap, TALL, CAPTION)
    image = (inputs["input_ids"][0] == cap.image_token_id).nonzero().flatten()
    logits, hidden = hooked_forward(cap.model, layer, inputs)
    score = sum(torch.log_softmax(logits[0].float(), -1)[p, t] for p, t in tokens.word_positions[3])
    gradient, = torch.autograd.grad(score, hidden)
    acts, grads = hidden[0, image].detach(), gradient[0, image]  # raster order on the merged grid
    cam = torch.relu(acts @ grads.mean(dim=0)).reshape(3, 2)
    torch.testing.assert_close(result.layer_maps[3], cam, rtol=1e-4, atol=1e-6)


def test_batched_equals_looped(caps, version):
    cap = caps[version]
    methods = "gradcam,hirescam"
    batched_equals_looped(cap, WIDE, CAPTION, methods)
    # two grids and a repeated one: one forward per grid, the same maps as each image alone
    other = Image.fromarray((np.random.default_rng(3).random((58, 88, 3)) * 255).astype("uint8"))  # also 4x6
    images, captions = [WIDE, TALL, other], [CAPTION, "a red circle", "two green triangles"]
    batch_equals_alone(cap, images, captions, methods)


@pytest.mark.parametrize("method", ["all", "tam", "attention-gradcam", "relevance"])
def test_every_method_and_the_model_left_as_it_was(caps, version, method):
    cap = caps[version]
    deltas = cap.model.model.rope_deltas
    result = explain_leaving_the_model(cap, WIDE, CAPTION, method)
    assert cap.model.model.rope_deltas is deltas  # M-RoPE's offsets put back
    assert len(result.words) == 7 and result.maps.shape[1:] == (60, 90)
    if method != "all":  # tam and the attention methods: on the language model's merged grid
        assert result.for_method(method).layer_maps.shape == (7, 2, 3)
        assert torch.count_nonzero(result.for_method(method).layer_maps) > 0


def test_guided_gradcam_is_refused_by_name(caps):
    with pytest.raises(ValueError, match="guided-gradcam needs the image input as .*flattened patches"):
        caps["2"].explain(WIDE, CAPTION, method="guided-gradcam")


def test_generated_captions_and_prompt(saved, caps, version):
    cap = caps[version]
    captions = cap.generate_batch([WIDE, TALL, WIDE], max_words=3)
    assert captions[0] == captions[2] and captions[1] == cap.generate(TALL, max_words=3)
    prompted = captioning.load(str(saved[version]), prompt="What is in the picture?")
    inputs, _ = prompted.prepare(WIDE, CAPTION)
    by_hand = _by_hand_inputs(prompted, WIDE, CAPTION, prompt="What is in the picture?")
    assert inputs["input_ids"].tolist() == by_hand["input_ids"].tolist()


def test_frozen_weights_and_bf16():
    frozen_and_bf16(*tiny_qwen2_vl("2.5"), WIDE, CAPTION, correlation=0.9)


# ----------------------------------------------------------------------------- VQA
def test_vqa_answers_batched_and_scored_by_hand(answerers, version):
    answerer = answerers[version]
    answers = ["red", "two circles", "a blue square"]
    assert torch.count_nonzero(answers_batched_equal_alone(answerer, TALL, QUESTION, answers).layer_maps) > 0
    together = answers_batched_equal_alone(answerer, WIDE, QUESTION, answers)
    prompt = f"{QUESTION}\nAnswer the question using a single word or phrase."
    tokens, expected = reply_logprob_by_hand(answerer, _by_hand_inputs(answerer, WIDE, prompt=prompt),
                                             _by_hand_inputs(answerer, WIDE, "two circles", prompt=prompt))
    assert tokens >= 2 and together.scores[1] == pytest.approx(expected, rel=1e-4)


def test_vqa_top_answer_from_generation(answerers, version):
    answerer = answerers[version]
    top = answerer.answer(TALL, QUESTION, top_k=3)
    assert 1 <= len(top) <= 3 and top == sorted(top, key=lambda a: -a[1])
    result = answerer.explain(TALL, QUESTION)
    assert result.answer == top[0][0] and result.probabilities[0] == pytest.approx(top[0][1], rel=1e-4)
    assert result.maps.shape == (1, 90, 60)


@pytest.mark.parametrize("layer", [None, "model.language_model.layers.0"])
def test_vqa_methods_and_layers_batched_equal_looped(answerers, version, layer):
    answerer = answerers[version]
    answers = ["red", "two circles"]
    method = "gradcam,attention-gradcam,relevance"
    together = answers_batched_equal_alone(answerer, WIDE, QUESTION, answers, method=method, layer=layer)
    assert together.layer_maps.shape == ((2, 4, 6) if layer is None else (2, 2, 3))
    contrast = answerer.explain(WIDE, QUESTION, answer="red", contrast="blue", layer=layer)
    assert contrast.contrast_map.shape == (60, 90)


# ----------------------------------------------------------------------------- engine and CLI
def test_a_packed_layer_output_names_its_batch():
    """FunctionLayout(batch_size=...): a layer whose output packs the samples' tokens into one
    sequence (no batch dimension) still gets (B,) targets."""
    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 4)

        def forward(self, x):  # (B, 3, 2, 2) -> tokens of all samples packed: (B * 4, 3)
            packed = self.proj(x.flatten(2).transpose(1, 2).reshape(-1, 3))
            return packed.reshape(x.shape[0], 4, 4).sum(dim=(1, 2))[:, None]

    model = Packed()
    layout = FunctionLayout(lambda t, lead: t.reshape(*t.shape[:lead - 1], 2, 2, 2, 4).movedim(-1, lead),
                            batch_size=lambda a: a.shape[0] // 4)
    exp = mg.explain(model, torch.randn(2, 3, 2, 2), [mg.targets.ClassScore(0)], model.proj, layout=layout)
    assert exp.layer_maps.shape == (1, 2, 2, 2)


def test_cli_caption_and_vqa(saved, tmp_path):
    assert len(cli_caption_and_vqa(saved["2.5"], WIDE, CAPTION, QUESTION, tmp_path)["words"]) == 7


def test_eval_run(saved, tmp_path):
    """The eval loop: captions generated from preprocessed (packed) pixels, explained per grid."""
    eval_run_with_a_prompt(saved["2.5"], tmp_path)


def test_preprocessed_pixels_of_several_images(caps):
    """The eval loop's path: the images' packed patches concatenated, split by their geometries."""
    from_preprocessed_pixels(caps["2.5"], [WIDE, TALL, WIDE], [CAPTION, "a red circle", "two circles"],
                             "patches given for images of")
