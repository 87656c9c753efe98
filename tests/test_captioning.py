"""The captioning adapter on a random-weight default-family model: targets, alignment, geometry,
batching and errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import mmgradcam as mg
from mmgradcam.data.shapes import make_image
from mmgradcam.tasks import captioning
from mmgradcam.tasks.captioning import TokensLogProb, word_targets
from mmgradcam.tasks.geometry import Letterbox
from mmgradcam.tasks.text import join_words, split_words
from tiny import tiny_captioner

WORDS = "a an two red green blue circle circles square star stars to the left of and above , small large".split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_captioner(tmp_path_factory.mktemp("tiny_captioner"), WORDS, max_tokens=12)


@pytest.fixture(scope="module")
def captioner(tiny_dir):
    return captioning.load(str(tiny_dir))


@pytest.fixture(scope="module")
def image():
    pixels, _, _ = make_image(0, seed=5, size=96)
    return Image.fromarray(pixels[:, :80])  # non-square: 96 x 80


def test_word_split_and_join():
    assert split_words("A red circle, two Stars?") == ["a", "red", "circle", ",", "two", "stars", "?"]
    assert join_words(["a", "red", "circle", ",", "a", "star"]) == "a red circle, a star"


def test_tokens_align_with_words(captioner):
    tokens = captioner.tokenize("a red circle, two star")
    assert tokens.words == ["a", "red", "circle", "two", "star"]
    ids = tokens.input_ids[0].tolist()
    assert ids[0] == captioner.vocab.bos_id
    for word, positions in zip(tokens.words, tokens.word_positions):
        (position, token), = positions
        assert captioner.vocab.words[token] == word
        assert ids[position + 1] == token  # the logit at p predicts input token p + 1


def test_word_logprob_is_teacher_forced_logprob(captioner, image):
    result = captioner.explain(image, "a red circle and a blue square")
    inputs, _ = captioner.preprocess(image)
    tokens = captioner.tokenize(result.caption)
    with torch.no_grad():
        logprobs = torch.log_softmax(captioner.model(inputs["pixel_values"], tokens.input_ids), -1)[0]
    ids = tokens.input_ids[0]
    expected = [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    word_rows = [i for i, t in enumerate(split_words(result.caption)) if t != ","]
    np.testing.assert_allclose(result.word_logprobs, [expected[i] for i in word_rows], rtol=1e-5)
    np.testing.assert_allclose(result.caption_logprob, sum(expected), rtol=1e-5)


def test_multi_token_word_sums_its_tokens():
    logits = torch.randn(2, 5, 7)
    target = TokensLogProb([[(1, 3), (2, 6)], [(0, 2)]])
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(target(logits), torch.stack([lp[0, 1, 3] + lp[0, 2, 6], lp[1, 0, 2]]))


def test_batched_word_maps_equal_one_word_at_a_time(captioner, image):
    caption = "a red circle to the left of a blue square"
    result = captioner.explain(image, caption)
    inputs, geometry = captioner.preprocess(image)
    tokens = captioner.tokenize(caption)
    model_inputs = captioner.batch_inputs(inputs["pixel_values"], [tokens])
    per_word, whole = word_targets(tokens)
    for j, target in enumerate(per_word):
        single = mg.explain(captioner.model, model_inputs, [target], captioner.default_layer)
        torch.testing.assert_close(result.layer_maps[j], single.layer_maps[0, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.maps[j], geometry.invert(single.maps[0, 0]), rtol=1e-5, atol=1e-6)
    # gradients are linear: the whole-caption target's gradient is the sum of the words'
    exp = mg.explain(captioner.model, model_inputs, per_word + [whole], captioner.default_layer)
    torch.testing.assert_close(exp.gradients[:-1].sum(0), exp.gradients[-1], rtol=1e-4, atol=1e-6)


def test_targets_used_again_do_not_keep_the_last_forward_alive(captioner, image):
    """The word targets' shared log-softmax is dropped with the forward's logits: a target reused
    in a later call does not hold the earlier call's autograd graph (and its activations)."""
    import gc

    tokens = captioner.tokenize("a red circle")
    model_inputs = captioner.batch_inputs(captioner.preprocess(image)[0]["pixel_values"], [tokens])
    per_word, _ = word_targets(tokens)
    first = mg.explain(captioner.model, model_inputs, per_word, captioner.default_layer)
    gc.collect()
    assert per_word[0].log_softmax._value is None
    again = mg.explain(captioner.model, model_inputs, per_word, captioner.default_layer)
    torch.testing.assert_close(again.layer_maps, first.layer_maps)
    with torch.no_grad():  # within one forward, every target reads the one cached log-softmax
        output = captioner.model(**model_inputs)
        per_word[0](output)
        cached = per_word[0].log_softmax._value
        per_word[1](output)
        assert per_word[1].log_softmax._value is cached
    del output
    gc.collect()
    assert per_word[0].log_softmax._value is None


def test_a_batch_of_images_equals_one_image_at_a_time(captioner, image):
    other = Image.fromarray(make_image(1, seed=5, size=64)[0])
    captions = ["a red circle , a blue square and two stars", None, "a green star"]
    together = captioner.explain_batch([image, other, other], captions)
    assert together[1].caption == captioner.generate(other)
    for result, img, caption in zip(together, [image, other, other], captions):
        alone = captioner.explain(img, caption)
        assert result.words == alone.words and result.caption == alone.caption
        torch.testing.assert_close(result.maps, alone.maps, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.word_logprobs, alone.word_logprobs, rtol=1e-5, atol=1e-6)


def test_maps_are_at_the_original_image_size(captioner, image):
    result = captioner.explain(image)  # generated caption
    assert result.maps.shape[1:] == (96, 80) and result.caption_map.shape == (96, 80)
    assert result.layer_maps.shape[1:] == (8, 8)
    assert len(result.words) == len(result.word_logprobs) == result.maps.shape[0]
    assert bool(result.seen.all())


def test_letterbox_inverts_exactly():
    box = Letterbox((30, 60), 64)
    assert box.content == (16, 0, 32, 64)
    ramp = torch.arange(64.0)[None, :].expand(64, 64).clone()  # varies along x only
    back = box.invert(ramp)
    assert back.shape == (30, 60)
    # the content spans the full model width, so x maps linearly onto the original 60 columns
    assert back[0, 0] < 1.5 and back[0, -1] > 62 and torch.allclose(back[0], back[-1])
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    padded = np.asarray(box.apply(image))
    assert (padded[20, 10] == [255, 0, 0]).all() and (padded[5, 10] == [128, 128, 128]).all()


def test_guided_gradcam_and_methods(captioner, image):
    caption = "a red circle"
    guided = captioner.explain(image, caption, method="guided-gradcam")
    assert guided.guided_maps.shape == (3, 96, 80) and guided.method == "guided-gradcam"
    plain = captioner.explain(image, caption)
    torch.testing.assert_close(guided.maps, plain.maps)
    for method in ["gradcam++", "hirescam", "layercam", "xgradcam"]:
        assert captioner.explain(image, caption, method=method).method == method
    counter = captioner.explain(image, caption, counterfactual=True)
    assert counter.counterfactual and not torch.equal(counter.maps, plain.maps)


def test_bad_captions_get_clear_errors(captioner, image):
    with pytest.raises(ValueError, match="lacks: 'zebra'"):
        captioner.explain(image, "a red zebra")
    with pytest.raises(ValueError, match="is empty"):
        captioner.explain(image, "  , ")
    with pytest.raises(ValueError, match="limit is 11"):
        captioner.explain(image, " ".join(["red"] * 12))
    with pytest.raises(ValueError, match="not a submodule"):
        captioner.explain(image, "a red circle", layer="encoder.layer9")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        captioning.load(str(tmp_path / "nowhere"))
    with pytest.raises(OSError, match="needs the hub"):
        captioning.load("nobody/no-such-model")
    (tmp_path / "config.json").write_text('{"task": "captioning", "family": "default"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises((ValueError, KeyError)):
        captioning.load(str(tmp_path))


def test_state_of_the_model_is_kept(captioner, image):
    model = captioner.model
    modes = [m.training for m in model.modules()]
    captioner.explain(image, "a red circle", method="guided-gradcam")
    assert modes == [m.training for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_selected_words_equal_their_maps_from_all_words(captioner, image):
    caption = "a red circle and two blue stars"
    everything = captioner.explain(image, caption)
    chosen = captioner.explain_batch([image], [caption], select=lambda words: [2, 6])[0]
    for j in (2, 6):
        torch.testing.assert_close(chosen.maps[j], everything.maps[j], rtol=1e-4, atol=1e-6)
        assert chosen.word_logprobs[j] == pytest.approx(everything.word_logprobs[j], rel=1e-5)
    assert torch.count_nonzero(chosen.maps[0]) == 0 and np.isnan(chosen.word_logprobs[0])
    with pytest.raises(IndexError, match="select chose word indices"):
        captioner.explain_batch([image], [caption], select=lambda words: [9])
