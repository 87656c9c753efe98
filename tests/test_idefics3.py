"""Idefics3 and SmolVLM on tiny random-weight configs (2-block SigLIP-style vision model on 32 px
tiles, patch 8, the connector's 2x2 pixel shuffle; 2-layer Llama decoder; in-memory BPE tokenizer
with the family's special tokens and chat template; the real processors with the longest edge at
64 px), saved with save_pretrained and loaded by path: the prompt laid out per tile grid, the
measured resize, the tiles stitched back (from the pixels, and through the pixel shuffle), word
maps at the image size, Grad-CAM by hand on the stitched grid, batched equal to looped, every
method, generative VQA, the CLI and a tiny eval."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmgradcam.tasks import captioning
from mmgradcam.tasks.idefics3 import resized_image
from chat_checks import (answers_batched_equal_alone, batch_equals_alone, batched_equals_looped, cli_caption_and_vqa,
                         eval_run_with_a_prompt, explain_leaving_the_model, frozen_and_bf16, from_preprocessed_pixels,
                         hooked_forward, reply_logprob_by_hand, resized_with_nothing_cut)
from hf_tiny import save_tiny, tiny_idefics3

FAMILIES = ["idefics3", "smolvlm"]
CLASSES = {"idefics3": ("Idefics3ChatCaptioner", "Idefics3ChatVQA"), "smolvlm": ("SmolVLMCaptioner", "SmolVLMVQA")}
CAPTION = "two circles, a triangle above the squares"
WORDS = ["two", "circles", "a", "triangle", "above", "the", "squares"]
QUESTION = "what color is the circle ?"
PROMPT = "Describe the image."
PATCHES, SIDE = 4, 2  # a 32 px tile: 4x4 patches of 8 px; 2x2 language-model tokens after the shuffle


def _image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


# the longest edge resized to 64, then both sides to multiples of the 32 px tile:
# 40x100 -> 26x64 -> 32x64 (1x2 tiles), 100x40 -> 64x32 (2x1), 90x100 -> 58x64 -> 64x64 (2x2)
WIDE, TALL, SQUARE = _image(40, 100, 0), _image(100, 40, 1), _image(90, 100, 2)
TILES = {"wide": (1, 2), "tall": (2, 1), "square": (2, 2)}
IMAGES = {"wide": WIDE, "tall": TALL, "square": SQUARE}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    if request.param == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words")
    return request.param


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for name in FAMILIES:
        if name == "smolvlm":
            try:
                import num2words  # noqa: F401
            except ImportError:
                continue
        paths[name] = save_tiny(tmp_path_factory.mktemp(name) / f"tiny-{name}",
                                tiny_idefics3(name, seed=FAMILIES.index(name)))
    return paths


def _by_hand_inputs(adapter, image, reply: str = "", prompt: str = PROMPT) -> dict:
    """The family's chat written out by hand, through the processor (which expands <image>)."""
    text = f"<|endoftext|>User:<image>{prompt}<end_of_utterance>\nAssistant:" + (f" {reply}" if reply else "")
    return dict(adapter.chat(images=image, text=text, return_tensors="pt", add_special_tokens=False))


def _stitch_by_hand(views: torch.Tensor, tiles: tuple[int, int], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(views, side*side, C) tokens -> the tiles as one (rows*side, cols*side, C) grid (tile (r, c)
    at rows r*side.., columns c*side..) and the global view's (side, side, C) grid."""
    rows, cols = tiles
    grid = torch.zeros(rows * side, cols * side, views.shape[-1])
    for r in range(rows):
        for c in range(cols):
            grid[r * side:(r + 1) * side, c * side:(c + 1) * side] = views[r * cols + c].reshape(side, side, -1)
    return grid, views[-1].reshape(side, side, -1)


def _cam_by_hand(acts: torch.Tensor, grads: torch.Tensor, tiles: tuple[int, int], side: int) -> torch.Tensor:
    """Grad-CAM on the tiles' grid plus Grad-CAM on the global view's grid repeated over the same cells."""
    tile_acts, global_acts = _stitch_by_hand(acts, tiles, side)
    tile_grads, global_grads = _stitch_by_hand(grads, tiles, side)
    tile_cam = (tile_acts * tile_grads.mean(dim=(0, 1))).sum(-1)
    global_cam = (global_acts * global_grads.mean(dim=(0, 1))).sum(-1)
    rows, cols = tiles
    return torch.relu(tile_cam + global_cam.repeat_interleave(rows, 0).repeat_interleave(cols, 1))


# ----------------------------------------------------------------------------- loading and layout
def test_loaded_by_path_with_the_preset_layer(caps, answerers, family):
    cap, answerer = caps[family], answerers[family]
    assert cap.family == answerer.family == family
    assert (type(cap).__name__, type(answerer).__name__) == CLASSES[family]
    assert cap.default_layer == answerer.default_layer == "model.vision_model.encoder.layers.1"
    assert "post-layernorm" in cap.layer_reason and "pixel-shuffle" in cap.layer_reason
    assert cap.prompt_text(PROMPT) == f"<|endoftext|>User:<image>{PROMPT}<end_of_utterance>\nAssistant:"


@pytest.mark.parametrize("name", ["wide", "tall", "square"])
def test_the_prompt_is_laid_out_per_tile_grid(caps, family, name):
    cap, image, (rows, cols) = caps[family], IMAGES[name], TILES[name]
    inputs, geometry = cap.prepare(image, CAPTION)
    by_hand = _by_hand_inputs(cap, image, CAPTION)
    assert inputs["input_ids"].tolist() == by_hand["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], by_hand["pixel_values"])
    assert inputs["pixel_values"].shape == (1, rows * cols + 1, 3, 32, 32)
    tokens = cap.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens.count("<image>") == (rows * cols + 1) * SIDE * SIDE
    assert [t for t in tokens if t.startswith("<row_")] == \
        [f"<row_{r + 1}_col_{c + 1}>" for r in range(rows) for c in range(cols)]
    assert tokens.count("<global-img>") == 1 and geometry.input_size == (rows * 32, cols * 32)
    with cap.images_at([geometry]):
        laid = cap.tokenize(CAPTION)
    assert laid.words == WORDS and max(len(p) for p in laid.word_positions) >= 2  # subwords merged
    assert all(laid.input_ids[0, p + 1] == t for positions in laid.word_positions for p, t in positions)
    with pytest.raises(ValueError, match="depend on the image"):
        cap.tokenize(CAPTION)  # outside a call that knows the image


def test_geometry_is_the_measured_resize_with_nothing_cut(caps):
    cap = caps["idefics3"]
    resized_with_nothing_cut(cap.processor.geometry((40, 100)), (40, 100), (32, 64), rel=2e-3)
    # a 64x32 image is neither resized nor cut: its two tiles stitched back are the image
    exact = _image(64, 32, 5)
    views = cap.chat.image_processor(images=exact, return_tensors="pt")["pixel_values"][0]
    assert views.shape == (3, 3, 32, 32)
    mean, std = (torch.tensor(v)[:, None, None] for v in cap.normalization)
    expected = torch.from_numpy(np.asarray(exact, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(resized_image(views, 2, 1) * std + mean, expected, atol=2e-3, rtol=0)


def test_the_tiles_patch_grids_stitched_from_the_pixels(caps, family):
    """The vision model's patch embedding of each view, laid out by the adapter, against the patch
    embedding of the stitched resized image computed by hand (the same position embedding in every tile)."""
    cap = caps[family]
    inputs = _by_hand_inputs(cap, SQUARE)
    embeddings = cap.model.model.vision_model.embeddings
    captured = {}
    handle = embeddings.register_forward_hook(lambda m, a, o: captured.__setitem__("x", o))
    try:
        with torch.no_grad(), cap.forward_context():
            cap.model(**inputs)
    finally:
        handle.remove()
    views = inputs["pixel_values"][0]
    with torch.no_grad():
        patches = embeddings.patch_embedding(resized_image(views, 2, 2)[None])[0]  # (C, 8, 8)
        position = embeddings.position_embedding.weight.T.reshape(-1, PATCHES, PATCHES).repeat(1, 2, 2)
        whole = embeddings.patch_embedding(views[-1:])[0] + position[:, :PATCHES, :PATCHES]
    with cap.images_at([cap.processor.geometry((90, 100))]):
        laid = cap.layer_options["layout"].to_bchw(captured["x"], lead=1)[0]
    channels = patches.shape[0]
    assert laid.shape == (2 * channels, 8, 8)
    torch.testing.assert_close(laid[:channels], patches + position, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(laid[channels:], whole.repeat_interleave(2, 1).repeat_interleave(2, 2),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("view, patch", [(1, (3, 1)), (2, (0, 3)), (4, (2, 2))])
def test_one_patch_moves_only_its_language_model_token(caps, view, patch):
    """A change at one patch of one view (the vision model's output) changes exactly one token of
    the language model's input, which the layout puts at that patch's cell: 2x2 patches per token."""
    cap = caps["idefics3"]
    inputs = _by_hand_inputs(cap, SQUARE, CAPTION)
    norm = cap.model.model.vision_model.post_layernorm
    i, j = patch

    def nudge(module, args, output):
        output = output.clone()
        output[view, i * PATCHES + j] += 1.0
        return output

    embeds = {}
    text_model = cap.model.model.text_model
    record = text_model.register_forward_pre_hook(
        lambda m, a, k: embeds.__setitem__(len(embeds), k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad(), cap.forward_context():
            cap.model(**inputs)
            handle = norm.register_forward_hook(nudge)
            try:
                cap.model(**inputs)
            finally:
                handle.remove()
            changed = (embeds[1] - embeds[0]).abs().sum(-1)[0] > 0
            assert int(changed.sum()) == 1
            onehot = changed.float()[None, :, None]  # (1, L, 1)
            with cap.images_at([cap.processor.geometry((90, 100))]):
                laid = cap.layer_options["layout"].to_bchw(onehot, lead=1)[0]  # (2, 4, 4)
    finally:
        record.remove()
    expected = torch.zeros(2, 4, 4)
    if view < 4:  # tile (r, c) of the 2x2 grid: its 2x2 tokens at rows 2r.., columns 2c..
        r, c = divmod(view, 2)
        expected[0, 2 * r + i // 2, 2 * c + j // 2] = 1
    else:  # the global view: its token repeated over the cells of the whole image it covers
        expected[1, 2 * (i // 2):2 * (i // 2) + 2, 2 * (j // 2):2 * (j // 2) + 2] = 1
    torch.testing.assert_close(laid, expected)


# ----------------------------------------------------------------------------- captioning
def test_word_maps_at_the_image_size(caps, family):
    cap = caps[family]
    for name in ("wide", "tall", "square"):
        image, (rows, cols) = IMAGES[name], TILES[name]
        result = cap.explain(image, CAPTION)
        assert result.words == WORDS
        assert result.maps.shape == (7, image.height, image.width)
        assert result.layer_maps.shape == (7, rows * PATCHES, cols * PATCHES)
        assert torch.count_nonzero(result.layer_maps) > 0 and bool(result.seen.all())
        with torch.no_grad():
            logits = cap.model(**_by_hand_inputs(cap, image, CAPTION)).logits
        logprobs = torch.log_softmax(logits[0].float(), -1)
        with cap.images_at([cap.processor.geometry((image.height, image.width))]):
            tokens = cap.tokenize(CAPTION)
        for positions, score in zip(tokens.word_positions, result.word_logprobs):
            assert score == pytest.approx(float(sum(logprobs[p, t] for p, t in positions)), rel=1e-4, abs=1e-5)
        shuffled = cap.explain(image, CAPTION, layer="model.connector")  # after the pixel shuffle
        assert shuffled.layer_maps.shape == (7, rows * SIDE, cols * SIDE)


@pytest.mark.parametrize("name", ["tall", "square"])
def test_gradcam_by_hand(caps, family, name):
    """One forward and one backward per word, Grad-CAM by hand from a hook on the preset layer
    (the views' (16, C) tokens as rows): the tiles' Grad-CAM on their stitched grid plus the global
    view's repeated over it, then the ReLU."""
    cap, image, tiles = caps[family], IMAGES[name], TILES[name]
    result = cap.explain(image, CAPTION, method="gradcam")
    with cap.images_at([cap.processor.geometry((image.height, image.width))]):
        tokens = cap.tokenize(CAPTION)
    inputs = _by_hand_inputs(cap, image, CAPTION)
    for j, positions in enumerate(tokens.word_positions):
        logits, activation = hooked_forward(cap.model, cap.default_layer, inputs)
        score = sum(torch.log_softmax(logits[0].float(), -1)[p, t] for p, t in positions)
        gradient, = torch.autograd.grad(score, activation)
        cam = _cam_by_hand(activation.detach(), gradient, tiles, PATCHES)
        torch.testing.assert_close(result.layer_maps[j], cam, rtol=1e-4, atol=1e-6)
        assert result.word_logprobs[j] == pytest.approx(float(score.detach()), rel=1e-5)


def test_a_layer_of_the_language_model_reads_every_views_tokens(caps, family):
    cap, tiles = caps[family], TILES["square"]
    layer = "model.text_model.layers.0"
    result = cap.explain(SQUARE, CAPTION, layer=layer)
    assert result.layer_maps.shape == (7, 4, 4) and result.maps.shape == (7, 90, 100)
    with cap.images_at([cap.processor.geometry((90, 100))]):
        tokens = cap.tokenize(CAPTION)
    inputs = _by_hand_inputs(cap, SQUARE, CAPTION)
    image = (inputs["input_ids"][0] == cap.image_token_id).nonzero().flatten()
    logits, hidden = hooked_forward(cap.model, layer, inputs)
    score = sum(torch.log_softmax(logits[0].float(), -1)[p, t] for p, t in tokens.word_positions[3])
    gradient, = torch.autograd.grad(score, hidden)
    acts = hidden[0, image].detach().reshape(5, SIDE * SIDE, -1)  # the views' tokens in sequence order
    grads = gradient[0, image].reshape(5, SIDE * SIDE, -1)
    torch.testing.assert_close(result.layer_maps[3], _cam_by_hand(acts, grads, tiles, SIDE), rtol=1e-4, atol=1e-6)


def test_batched_equals_looped(caps, family):
    cap = caps[family]
    methods = "gradcam,hirescam"
    batched_equals_looped(cap, WIDE, CAPTION, methods)
    # two tile grids and a repeated one: one forward per grid, the same maps as each image alone
    other = _image(38, 96, 3)  # also 1x2 tiles
    images, captions = [WIDE, TALL, other], [CAPTION, "a red circle", "two green triangles"]
    batch_equals_alone(cap, images, captions, methods)


@pytest.mark.parametrize("method", ["all", "tam", "attention-gradcam", "relevance"])
def test_every_method_and_the_model_left_as_it_was(caps, family, method):
    cap = caps[family]
    result = explain_leaving_the_model(cap, SQUARE, CAPTION, method)
    assert len(result.words) == 7
    if method != "all":  # tam and the attention methods: on the language model's stitched grid
        assert result.for_method(method).layer_maps.shape == (7, 4, 4)
        assert torch.count_nonzero(result.for_method(method).layer_maps) > 0


def test_tam_sums_the_tiles_and_the_global_views_logits(caps):
    """TAM's raw map of a word: the LM head's logit of its tokens at each image token, the tile's
    token and the global view's token covering a cell summed (TAM's own processing after that)."""
    cap = caps["idefics3"]
    inputs = _by_hand_inputs(cap, WIDE, CAPTION)
    with torch.no_grad():
        logits = cap.model(**inputs).logits[0]
    image = (inputs["input_ids"][0] == cap.image_token_id).nonzero().flatten()
    at_image = logits[image].reshape(3, SIDE * SIDE, -1)
    tiles, whole = _stitch_by_hand(at_image, (1, 2), SIDE)
    expected = tiles + whole.repeat_interleave(2, 1)  # 1 row, 2 columns of tiles
    prepared, geometry = cap.prepare(WIDE, CAPTION)
    with torch.no_grad(), cap.images_at([geometry]), cap.forward_context():
        output = cap.model(**prepared)
        found, grid = cap.image_token_logits(output, prepared)
    assert grid == (2, 4)
    torch.testing.assert_close(found[0].reshape(2, 4, -1), expected, rtol=1e-4, atol=1e-5)


def test_guided_gradcam_is_refused_by_name(caps):
    with pytest.raises(ValueError, match="guided-gradcam needs the image input as .*tiles and a global view"):
        caps["idefics3"].explain(WIDE, CAPTION, method="guided-gradcam")


def test_a_single_view_without_splitting():
    """do_image_splitting=False: the image squeezed to one 32 px view (aspect ratio not kept, nothing
    cut); its maps on the 4x4 patch grid, the attention methods on the 2x2 token grid."""
    model, processor = tiny_idefics3("idefics3", splitting=False)
    cap = captioning.load(model, processor)
    geometry = cap.processor.geometry((40, 100))
    assert geometry.input_size == (32, 32) and geometry.scale == pytest.approx((40 / 32, 100 / 32), rel=2e-3)
    result = cap.explain(WIDE, CAPTION, method="gradcam,attention-gradcam,relevance")
    assert result.layer_maps.shape == (7, PATCHES, PATCHES) and result.maps.shape == (7, 40, 100)
    assert result.for_method("relevance").layer_maps.shape == (7, SIDE, SIDE)
    inputs = dict(processor(images=WIDE, text=cap.prompt_text(PROMPT) + " " + CAPTION, return_tensors="pt",
                            add_special_tokens=False))
    assert inputs["pixel_values"].shape == (1, 1, 3, 32, 32)
    with cap.images_at([geometry]):
        tokens = cap.tokenize(CAPTION)
    assert tokens.input_ids.tolist() == inputs["input_ids"].tolist()
    logits, activation = hooked_forward(model, cap.default_layer, inputs)
    score = sum(torch.log_softmax(logits[0].float(), -1)[p, t] for p, t in tokens.word_positions[0])
    gradient, = torch.autograd.grad(score, activation)
    cam = torch.relu(activation[0].detach() @ gradient[0].mean(dim=0)).reshape(PATCHES, PATCHES)
    torch.testing.assert_close(result.layer_maps[0], cam, rtol=1e-4, atol=1e-6)


def test_an_image_that_fits_one_tile_is_a_single_view():
    """Splitting on, but the longest edge resized to the tile size: no tiles, the global view alone
    (the processor's rows = cols = 0 layout, without <row_r_col_c> tokens)."""
    model, processor = tiny_idefics3("idefics3", longest_edge=32)
    cap = captioning.load(model, processor)
    inputs, geometry = cap.prepare(WIDE, CAPTION)
    tokens = cap.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert inputs["pixel_values"].shape == (1, 1, 3, 32, 32) and geometry.input_size == (32, 32)
    assert tokens.count("<image>") == SIDE * SIDE and not [t for t in tokens if t.startswith("<row_")]
    # 40x100 -> 12x32 -> 32x32 (the short side up to a multiple of the tile): the aspect ratio is not kept
    assert geometry.scale == pytest.approx((40 / 32, 100 / 32), rel=2e-3)
    result = cap.explain(WIDE, CAPTION, method="gradcam,tam")
    assert result.layer_maps.shape == (7, PATCHES, PATCHES) and result.for_method("tam").layer_maps.shape == (7, 2, 2)


def test_frozen_weights_and_bf16():
    frozen_and_bf16(*tiny_idefics3("idefics3"), SQUARE, CAPTION, correlation=0.9)


def test_generated_captions_and_prompt(saved, caps, family):
    cap = caps[family]
    captions = cap.generate_batch([WIDE, TALL, WIDE], max_words=3)
    assert captions[0] == captions[2] and captions[1] == cap.generate(TALL, max_words=3)
    assert all(1 <= len(c.split()) <= 3 for c in captions)
    prompted = captioning.load(str(saved[family]), prompt="What is in the picture?")
    inputs, _ = prompted.prepare(WIDE, CAPTION)
    by_hand = _by_hand_inputs(prompted, WIDE, CAPTION, prompt="What is in the picture?")
    assert inputs["input_ids"].tolist() == by_hand["input_ids"].tolist()


def test_preprocessed_pixels_of_several_images(caps):
    """The eval loop's path: the images' views concatenated, split by their geometries."""
    pixels = from_preprocessed_pixels(caps["idefics3"], [WIDE, TALL, WIDE], [CAPTION, "a red circle", "two circles"],
                                      "expected the views from preprocess")
    assert pixels.shape == (9, 3, 32, 32)  # 3 + 3 + 3 views


# ----------------------------------------------------------------------------- VQA
def test_vqa_answers_batched_and_scored_by_hand(answerers, family):
    answerer = answerers[family]
    answers = ["red", "two circles", "a blue square"]
    assert torch.count_nonzero(answers_batched_equal_alone(answerer, SQUARE, QUESTION, answers).layer_maps) > 0
    together = answers_batched_equal_alone(answerer, WIDE, QUESTION, answers)
    tokens, expected = reply_logprob_by_hand(answerer, _by_hand_inputs(answerer, WIDE, prompt=QUESTION),
                                             _by_hand_inputs(answerer, WIDE, "two circles", prompt=QUESTION))
    assert tokens >= 2 and together.scores[1] == pytest.approx(expected, rel=1e-4)


def test_vqa_top_answer_from_generation(answerers, family):
    answerer = answerers[family]
    top = answerer.answer(TALL, QUESTION, top_k=5)  # explain ranks five beams too
    assert 1 <= len(top) <= 5 and top == sorted(top, key=lambda a: -a[1])
    result = answerer.explain(TALL, QUESTION)
    assert result.answer == top[0][0] and result.probabilities[0] == pytest.approx(top[0][1], rel=1e-4)
    assert result.maps.shape == (1, 100, 40) and result.layer_maps.shape == (1, 8, 4)


@pytest.mark.parametrize("layer", [None, "model.text_model.layers.0"])
def test_vqa_methods_and_layers_batched_equal_looped(answerers, layer):
    answerer = answerers["idefics3"]
    answers = ["red", "two circles"]
    method = "gradcam,attention-gradcam,relevance"
    together = answers_batched_equal_alone(answerer, SQUARE, QUESTION, answers, method=method, layer=layer)
    assert together.layer_maps.shape == ((2, 8, 8) if layer is None else (2, 4, 4))
    contrast = answerer.explain(SQUARE, QUESTION, answer="red", contrast="blue", layer=layer)
    assert contrast.contrast_map.shape == (90, 100)


# ----------------------------------------------------------------------------- CLI and eval
def test_cli_caption_and_vqa(saved, tmp_path):
    summary = cli_caption_and_vqa(saved["idefics3"], WIDE, CAPTION, QUESTION, tmp_path)
    written = [w["logprob"] for w in summary["words"]]
    assert len(written) == 7
    assert written == pytest.approx(captioning.load(str(saved["idefics3"])).explain(WIDE, CAPTION).word_logprobs,
                                    rel=1e-4)


def test_eval_run(saved, tmp_path):
    """The eval loop: captions generated from preprocessed (concatenated) views, explained per tile grid."""
    eval_run_with_a_prompt(saved.get("smolvlm", saved["idefics3"]), tmp_path)
