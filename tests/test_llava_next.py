"""LLaVA-NeXT (CLIP tower with CLS, Llama decoder) and LLaVA-OneVision (SigLIP tower, Qwen2 decoder,
its tile grid downsampled above ``anyres_max_1``) on tiny random configs with their real processors
(tiles of 28 px = 4x4 patches of 7 px, small any-resolution grids), saved and loaded by path: the
any-resolution layout against the model's own token counts, the geometry of tiles and padding on
images whose aspect ratio forces a multi-tile grid, Grad-CAM on the stitched grid by hand, batched
equal to looped, every method, VQA, the CLI and the eval."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from chat_checks import explain_leaving_the_model
from hf_tiny import save_tiny, tiny_llava_next

CAPTION = "two circles, a triangle above the squares"
WORDS = ["two", "circles", "a", "triangle", "above", "the", "squares"]
QUESTION = "what color is the circle ?"


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


# 40x100 -> the 28x84 grid (3 tiles in a row): resized to 28x70, padded 7 px left and right (one cell each)
WIDE, TALL, SQUARE = _image(40, 100), _image(100, 40, 1), _image(50, 50, 2)
FAMILIES = ["next", "onevision"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("anyres")
    return {"next": save_tiny(root / "next", tiny_llava_next()),
            "onevision": save_tiny(root / "onevision", tiny_llava_next(onevision=True, max_tiles=1))}


def _by_hand_inputs(cap, image: Image.Image, caption: str) -> dict:
    """The chat (the template's generation prompt and the caption) through the processor."""
    text = cap.prompt_text("Describe the image.") + (" " if cap.family == "llava-next" else "") + caption
    inputs = dict(cap.chat(images=image, text=text, return_tensors="pt"))
    inputs.pop("batch_num_images", None)
    return inputs


def test_loaded_by_path_with_the_preset_layer(caps, answerers):
    assert type(caps["next"]).__name__ == "LlavaNextCaptioner" and type(answerers["next"]).__name__ == "LlavaNextVQA"
    assert caps["onevision"].family == answerers["onevision"].family == "llava-onevision"
    # vision_feature_layer: NeXT -2 of 3 blocks (block 1's output), OneVision -1 (the last block)
    assert caps["next"].default_layer == "model.vision_tower.encoder.layers.1"
    assert caps["onevision"].default_layer == "model.vision_tower.encoder.layers.2"
    assert "vision_feature_layer" in caps["next"].layer_reason


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(40, 100), (100, 40), (50, 50), (30, 30)])
def test_layout_against_the_models_own_token_counts(caps, family, size):
    cap = caps[family]
    grid = cap.anyres_grid(size)
    image = _image(*size)
    inputs = _by_hand_inputs(cap, image, "a red circle")
    assert int((inputs["input_ids"] == cap.image_token_id).sum()) == grid.image_tokens  # the processor's count
    with torch.no_grad():
        features = cap.vlm.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                              return_dict=True).pooler_output
    assert features[0].shape[0] == grid.image_tokens  # the model's own packing
    expected = {(40, 100): ((1, 3), (0, 4, 1, 10)), (100, 40): ((3, 1), (1, 10, 0, 4)),
                (50, 50): ((2, 2), (0, 8, 0, 8)), (30, 30): ((2, 2), (0, 8, 0, 8))}[size]
    assert (grid.tiles, grid.crop) == expected
    if family == "onevision" and size[0] != size[1]:  # 4x10 cells > 1 tile's worth: downsampled by sqrt(40/16)
        assert grid.packed == tuple(sorted((2, 6), reverse=size[0] > size[1]))
    tokens = cap.explain(image, "a red circle")
    assert tokens.maps.shape == (3, *size) and tokens.layer_maps.shape == (3, *grid.grid)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(40, 100), (100, 40)])
def test_a_corner_moves_only_its_cells(caps, family, size):
    """A change in the top-left 10x10 px moves only the patch embeddings over that corner, in the
    stitched tile view and in the base view; the geometry maps the corner there."""
    cap = caps[family]
    before = np.asarray(_image(*size)).copy()
    after = before.copy()
    after[:10, :10] = 255 - after[:10, :10]
    layer = cap.vlm.model.vision_tower.embeddings
    grids = []
    for array in (before, after):
        captured = {}
        handle = layer.register_forward_hook(lambda m, a, o: captured.__setitem__("a", o))
        try:
            inputs = _by_hand_inputs(cap, Image.fromarray(array), "a red circle")
            with torch.no_grad():
                cap.vlm(**inputs)
        finally:
            handle.remove()
        with cap.images_of([size]):
            grids.append(cap._tokens_to_grid(captured["a"], 1)[0])
    channels = grids[0].shape[0] // 2
    tiles = (grids[0][:channels] - grids[1][:channels]).abs().sum(0)
    base = (grids[0][channels:] - grids[1][channels:]).abs().sum(0)
    grid = cap.anyres_grid(size)
    h, w = grid.grid
    assert tiles[0, 0] > 0 and tiles[h - 1, w - 1] == 0
    geometry = cap.processor.geometry(size)
    # the corner's extent on the unpadded canvas, in cells (+1 cell for the resampling's reach)
    rows = int(np.ceil((10 - geometry.offset[0]) / geometry.scale[0] / grid.cell_pixels)) + 1
    cols = int(np.ceil((10 - geometry.offset[1]) / geometry.scale[1] / grid.cell_pixels)) + 1
    changed = torch.nonzero(tiles > 0)
    assert int(changed[:, 0].max()) < rows and int(changed[:, 1].max()) < cols
    assert base[h - 1, w - 1] == 0  # the base view upsampled: its far corner did not move either


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_at_the_image_size_and_every_pixel_seen(caps, family):
    cap = caps[family]
    result = cap.explain(WIDE, CAPTION)
    with cap.images_of([(40, 100)]):
        tokens = cap.tokenize(CAPTION)
    assert result.words == WORDS and max(len(p) for p in tokens.word_positions) >= 2  # words merged from subwords
    assert result.maps.shape == (7, 40, 100) and result.layer_maps.shape == (7, 4, 10)
    assert bool(result.seen.all()) and torch.count_nonzero(result.layer_maps) > 0
    geometry = cap.processor.geometry((40, 100))
    # the unpadded 4x10 cells (28x70 px) hold exactly the 28x70 resized image: scale 40/28 and no offset
    assert geometry.input_size == (28, 70)
    assert geometry.scale == pytest.approx((40 / 28, 100 / 70), rel=1e-3)
    assert geometry.offset == pytest.approx((0.0, 0.0), abs=0.05)


def test_gradcam_by_hand_on_the_stitched_grid(caps):
    """LLaVA-NeXT at the preset layer, one forward and backward per word: the tiles' patch grids
    (CLS dropped) stitched row by row over the 1x3 tile grid, the padded column of cells on each
    side cut, the base tile's grid upsampled to 4x10; Grad-CAM weights per view, maps summed."""
    cap = caps["next"]
    result = cap.explain(WIDE, CAPTION, method="gradcam")
    inputs = _by_hand_inputs(cap, WIDE, CAPTION)
    layer = cap.vlm.get_submodule(cap.default_layer)
    with cap.images_of([(40, 100)]):
        positions = cap.tokenize(CAPTION).word_positions
    for j, word in enumerate(positions):
        captured = {}
        handle = layer.register_forward_hook(lambda m, a, o: captured.__setitem__("a", o))
        try:
            logits = cap.vlm(**inputs).logits
        finally:
            handle.remove()
        score = sum(torch.log_softmax(logits[0].float(), -1)[p, t] for p, t in word)
        activation = captured["a"][0] if isinstance(captured["a"], tuple) else captured["a"]
        gradient, = torch.autograd.grad(score, activation)

        def views(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            patches = tokens[:, 1:].reshape(4, 4, 4, -1)  # 4 tiles (base + 3), CLS dropped, 4x4 patches
            stitched = torch.cat([patches[1 + c] for c in range(3)], dim=1)  # (4, 12, C)
            tiles = stitched[:, 1:11]  # the padding's cell on each side cut
            base = F.interpolate(patches[0].permute(2, 0, 1)[None], size=(4, 10), mode="bilinear",
                                 align_corners=False)[0].permute(1, 2, 0)
            return tiles, base

        (acts_t, acts_b), (grads_t, grads_b) = views(activation.detach()), views(gradient)
        cam = torch.relu(acts_t @ grads_t.mean(dim=(0, 1)) + acts_b @ grads_b.mean(dim=(0, 1)))
        torch.testing.assert_close(result.layer_maps[j], cam, rtol=1e-4, atol=1e-6)
        assert result.word_logprobs[j] == pytest.approx(float(score.detach()), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_looped_and_sizes_in_one_call(caps, family):
    cap = caps[family]
    together = cap.explain(WIDE, CAPTION, method="gradcam,hirescam", batched=True)
    looped = cap.explain(WIDE, CAPTION, method="gradcam,hirescam", batched=False)
    for name in together.methods:
        torch.testing.assert_close(together.for_method(name).maps, looped.for_method(name).maps, rtol=1e-4, atol=1e-6)
    # three layouts in one call (50x50 and 30x30 share one: 2x2 tiles, nothing cut): one forward
    # each, the same maps as alone
    images = [WIDE, TALL, SQUARE, WIDE, _image(30, 30, 3)]
    captions = [CAPTION, "a red circle", "two squares", "a blue star", "a yellow star"]
    several = cap.explain_batch(images, captions)
    for image, caption, result in zip(images, captions, several):
        alone = cap.explain(image, caption)
        assert result.maps.shape == (len(alone.words), image.height, image.width)
        torch.testing.assert_close(result.maps, alone.maps, rtol=1e-4, atol=1e-6)
    scores = cap.score_batch(images, captions)
    assert scores[1] == pytest.approx(several[1].word_logprobs, rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["all", "tam", "attention-gradcam", "relevance"])
def test_every_method_and_the_model_left_as_it_was(caps, family, method):
    cap = caps[family]
    result = explain_leaving_the_model(cap, TALL, CAPTION, method)
    assert len(result.words) == 7
    assert all(torch.count_nonzero(result.for_method(name).maps) > 0 for name in result.methods)
    with pytest.raises(ValueError, match="guided-gradcam needs the image input as .*tiles"):
        cap.explain(TALL, CAPTION, method="guided-gradcam")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layer_of_the_language_model(caps, family):
    """The hidden states at the image tokens: the base grid and the tile grid (newlines dropped;
    OneVision's downsampled 2x6), checked by hand for one word."""
    cap = caps[family]
    layer = "model.language_model.layers.0"
    result = cap.explain(WIDE, CAPTION, layer=layer)
    h, w = cap.anyres_grid((40, 100)).packed
    assert result.layer_maps.shape == (7, h, w) and torch.count_nonzero(result.layer_maps) > 0
    inputs = _by_hand_inputs(cap, WIDE, CAPTION)
    with cap.images_of([(40, 100)]):
        word = cap.tokenize(CAPTION).word_positions[3]
    image = (inputs["input_ids"][0] == cap.image_token_id).nonzero().flatten()
    captured = {}
    handle = cap.vlm.get_submodule(layer).register_forward_hook(lambda m, a, o: captured.__setitem__("a", o))
    try:
        logits = cap.vlm(**inputs).logits
    finally:
        handle.remove()
    hidden = captured["a"][0] if isinstance(captured["a"], tuple) else captured["a"]
    gradient, = torch.autograd.grad(sum(torch.log_softmax(logits[0].float(), -1)[p, t] for p, t in word), hidden)

    def views(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picked = states[0, image]
        base = picked[:16].reshape(4, 4, -1)
        tiles = picked[16:].reshape(h, w + 1, -1)[:, :w]  # the newline token ends every row
        up = F.interpolate(base.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        return tiles, up.permute(1, 2, 0)

    (acts_t, acts_b), (grads_t, grads_b) = views(hidden.detach()), views(gradient)
    cam = torch.relu(acts_t @ grads_t.mean(dim=(0, 1)) + acts_b @ grads_b.mean(dim=(0, 1)))
    torch.testing.assert_close(result.layer_maps[3], cam, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- VQA
@pytest.mark.parametrize("family", FAMILIES)
def test_vqa_answers_batched_equal_alone(answerers, family):
    answerer = answerers[family]
    answers = ["red", "two circles"]
    for layer in (None, "model.language_model.layers.0"):
        together = answerer.explain(TALL, QUESTION, answer=answers, method="gradcam,relevance", layer=layer)
        assert together.answers == answers and together.maps.shape == (2, 100, 40)
        for k, answer in enumerate(answers):
            alone = answerer.explain(TALL, QUESTION, answer=answer, method="gradcam,relevance", layer=layer)
            assert alone.score == pytest.approx(together.scores[k], rel=1e-5)
            for name in together.methods:
                torch.testing.assert_close(alone.for_method(name).map, together.for_method(name).maps[k],
                                           rtol=1e-4, atol=1e-6)
    top = answerer.answer(TALL, QUESTION, top_k=3)
    assert 1 <= len(top) <= 3
    result = answerer.explain(TALL, QUESTION)
    assert result.answer == top[0][0] and result.maps.shape == (1, 100, 40)


# ----------------------------------------------------------------------------- CLI and eval
def test_cli_caption_and_vqa(saved, tmp_path):
    from mmgradcam.cli import main

    WIDE.save(tmp_path / "img.png")
    for family, path in saved.items():
        out = tmp_path / family
        assert main(["caption", str(tmp_path / "img.png"), "--model", str(path), "--caption", CAPTION,
                     "--out", str(out / "cap")]) == 0
        assert np.load(out / "cap" / "maps.npz")["maps"].shape == (7, 40, 100)
        assert json.loads((out / "cap" / "result.json").read_text())["caption"] == CAPTION
        assert main(["vqa", str(tmp_path / "img.png"), QUESTION, "--model", str(path), "--answer", "red",
                     "--answer", "two circles", "--out", str(out / "vqa")]) == 0


def test_eval_run_and_preprocessed_pixels(saved, caps, tmp_path):
    """The eval loop: tiles padded to the most any image gets, generated and explained per layout."""
    from mmgradcam.cli import main
    from mmgradcam.data.shapes import write_split

    cap = caps["next"]
    prepared = [cap.preprocess(image) for image in (WIDE, TALL, WIDE)]
    pixels = torch.cat([inputs["pixel_values"] for inputs, _ in prepared])
    geometries = [geometry for _, geometry in prepared]
    assert cap.generate_from_pixels(pixels, max_words=3, geometries=geometries) == \
        cap.generate_batch([WIDE, TALL, WIDE], max_words=3)
    with pytest.raises(ValueError, match="needs each image's geometry"):
        cap.generate_from_pixels(pixels, max_words=3)
    paths = write_split(tmp_path / "data", "test", 2, seed=1)
    assert main(["eval", "--instances", str(paths["instances"]), "--captions", str(paths["captions"]),
                 "--images", str(paths["images"]), "--references", "--model", str(saved["onevision"]),
                 "--method", "gradcam,relevance", "--workers", "0", "--quiet", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["images"] == 2
