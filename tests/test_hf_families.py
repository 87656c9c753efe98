"""The Hugging Face families on tiny random-weight configs with in-memory tokenizers (offline)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mmgradcam as mg
from mmgradcam.tasks import captioning, vqa
from mmgradcam.tasks.captioning import word_targets
from hf_tiny import tiny_blip, tiny_git, tiny_vilt, tiny_vit_gpt2

CAPTION = "two circles, a triangle above the squares"
IMAGE = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8"))
BUILDERS = {"blip": tiny_blip, "git": tiny_git, "vit_gpt2": tiny_vit_gpt2}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def captioner(request):
    model, tokenizer, image_processor = BUILDERS[request.param]()
    return captioning.load(model, tokenizer=tokenizer, image_processor=image_processor)


def test_family_and_preset_layer(captioner):
    assert captioner.family in BUILDERS
    exp_layer = captioner.layer_root.get_submodule(captioner.default_layer)
    assert type(exp_layer).__name__.endswith("Layer")
    assert captioner.layer_reason


def test_word_maps_shape_and_alignment(captioner):
    result = captioner.explain(IMAGE, CAPTION)
    assert result.words == ["two", "circles", "a", "triangle", "above", "the", "squares"]
    assert result.maps.shape == (7, 40, 60) and result.layer_maps.shape[1:] == (4, 4)
    # each word's log-prob is the teacher-forced sum over its tokens, from the model itself
    tokens = captioner.tokenize(CAPTION)
    inputs, _ = captioner.preprocess(IMAGE)
    model_inputs = captioner.batch_inputs(inputs["pixel_values"], [tokens])
    with torch.no_grad():
        logits = mg.targets.logits_of(captioner.model(**model_inputs))
    length = tokens.input_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, -length:].float(), -1)[0]
    ids = tokens.input_ids[0]
    for word, positions, score in zip(result.words, tokens.word_positions, result.word_logprobs):
        assert all(ids[p + 1] == t for p, t in positions)
        assert score == pytest.approx(float(sum(logprobs[p, t] for p, t in positions)), rel=1e-4, abs=1e-5)
    # words split into several tokens are found whole
    split = {w: len(p) for w, p in zip(result.words, tokens.word_positions)}
    assert max(split.values()) >= 2


def test_batched_equals_looped_and_gradients_flow(captioner):
    result = captioner.explain(IMAGE, CAPTION)
    tokens = captioner.tokenize(CAPTION)
    inputs, geometry = captioner.preprocess(IMAGE)
    model_inputs = captioner.batch_inputs(inputs["pixel_values"], [tokens])
    per_word, _ = word_targets(tokens, captioner.text_logits_from_end)
    for j in (0, 1, 3):
        single = mg.explain(captioner.model, model_inputs, [per_word[j]], captioner.default_layer,
                            **captioner.layer_options)
        assert torch.count_nonzero(single.gradients) > 0  # the preset layer carries gradient
        torch.testing.assert_close(result.maps[j], geometry.invert(single.maps[0, 0]), rtol=1e-4, atol=1e-6)


def test_git_center_crop_is_marked_unseen():
    model, tokenizer, image_processor = tiny_git()
    git = captioning.load(model, tokenizer=tokenizer, image_processor=image_processor)
    result = git.explain(IMAGE, "a red circle")
    seen = result.seen
    assert not seen[:, :5].any() and not seen[:, -5:].any() and seen[:, 20:40].all()
    assert (result.maps[:, ~seen] == 0).all()


def test_probe_geometry_matches_the_clip_crop():
    from mmgradcam.tasks.hf import ProcessorGeometry

    _, _, image_processor = tiny_git(image_size=32)
    geometry = ProcessorGeometry(image_processor).geometry((40, 60))
    # resize the short side 40 -> 32 (factor 0.8: 60 -> 48), center crop 32: 8 px cut on each side
    assert geometry.scale == pytest.approx((1.25, 1.25), rel=1e-3)
    assert geometry.offset[1] == pytest.approx(8 * 1.25, abs=0.05) and geometry.offset[0] == pytest.approx(0, abs=0.05)


def test_save_pretrained_directory_loads_and_runs_the_cli(tmp_path):
    model, tokenizer, image_processor = tiny_blip()
    model.save_pretrained(tmp_path / "blip")
    tokenizer.save_pretrained(tmp_path / "blip")
    image_processor.save_pretrained(tmp_path / "blip")
    loaded = captioning.load(str(tmp_path / "blip"))
    assert loaded.family == "blip"
    IMAGE.save(tmp_path / "img.png")
    result = subprocess.run([sys.executable, "-m", "mmgradcam.cli", "caption", "img.png", "--caption", CAPTION,
                             "--model", str(tmp_path / "blip"), "--out", "out"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "out" / "maps.npz")["maps"].shape == (7, 40, 60)


def test_eval_accepts_a_local_hf_model(tmp_path):
    from mmgradcam.data.shapes import write_split

    model, tokenizer, image_processor = tiny_blip()
    for thing in (model, tokenizer, image_processor):
        thing.save_pretrained(tmp_path / "blip")
    paths = write_split(tmp_path / "data", "test", 2, seed=1)
    result = subprocess.run([sys.executable, "-m", "mmgradcam.cli", "eval", "--instances", str(paths["instances"]),
                             "--captions", str(paths["captions"]), "--images", str(paths["images"]), "--references",
                             "--model", str(tmp_path / "blip"), "--quiet", "--out", "ev"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["images"] == 2 and summary["config"]["model"].endswith("blip")


# ----------------------------------------------------------------------------- VQA
@pytest.fixture(scope="module")
def vilt():
    model, tokenizer, image_processor = tiny_vilt()
    return vqa.load(model, tokenizer=tokenizer, image_processor=image_processor)


def test_vilt_answers_batched_and_preset_layer(vilt):
    question = "what color is the circle ?"
    together = vilt.explain(IMAGE, question, answer=["red", "blue", "yes"])
    assert together.maps.shape == (3, 40, 60)
    for k, answer in enumerate(["red", "blue", "yes"]):
        torch.testing.assert_close(together.maps[k], vilt.explain(IMAGE, question, answer=answer).map,
                                   rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(together.layer_maps) > 0
    last_block = vilt.default_layer.rsplit(".", 1)[0] + "." + str(int(vilt.default_layer.rsplit(".", 1)[1]) + 1)
    with pytest.warns(UserWarning, match="every gradient at layer .* is zero"):
        vilt.explain(IMAGE, question, answer="red", layer=last_block)
    with pytest.raises(ValueError, match="not in the model's answer vocabulary"):
        vilt.explain(IMAGE, question, answer="purple")
    assert "visual_embed" not in vars(vilt.model.vilt.embeddings)  # the recording wrapper is gone


@pytest.mark.parametrize("seed", [0, 1])
def test_vilt_unshuffling_is_exact(seed):
    """Patches sampled in random order (max_image_length): a target reading the one token of patch
    (r, c) must light exactly grid cell (r, c)."""
    model, tokenizer, image_processor = tiny_vilt(max_image_length=20)  # 24 patches: sampled, shuffled
    adapter = vqa.load(model, tokenizer=tokenizer, image_processor=image_processor)
    inputs, _ = adapter.prepare(IMAGE, "what color is the circle ?")
    inputs = {**inputs, "output_hidden_states": True}
    block = int(adapter.default_layer.rsplit(".", 1)[1])
    text = inputs["input_ids"].shape[1]
    torch.manual_seed(seed)
    chosen = {}

    def one_patch(output):
        index = adapter._patch_index[0]
        position = int(torch.nonzero((index[:, 0] == index[3, 0]) & (index[:, 1] == index[3, 1]))[0])
        chosen["cell"] = (int(index[3, 0]), int(index[3, 1]))
        return output.hidden_states[block + 1][:, text + 1 + position].sum(-1)

    with adapter.forward_context():
        exp = mg.explain(adapter.model, inputs, [one_patch], adapter.default_layer, "hirescam",
                         **adapter.layer_options)
    signed = exp.signed_layer_maps[0, 0]
    r, c = chosen["cell"]
    assert signed[r, c] != 0
    signed[r, c] = 0
    assert torch.count_nonzero(signed) == 0


def test_blip_vqa_generative_scores():
    model, tokenizer, image_processor = tiny_blip(vqa=True)
    blip = vqa.load(model, tokenizer=tokenizer, image_processor=image_processor)
    question = "what color is the circle ?"
    together = blip.explain(IMAGE, question, answer=["red", "two circles"])
    assert together.maps.shape == (2, 40, 60) and torch.count_nonzero(together.layer_maps) > 0
    for k, answer in enumerate(["red", "two circles"]):
        alone = blip.explain(IMAGE, question, answer=answer)
        assert alone.score == pytest.approx(together.scores[k], rel=1e-4)
        torch.testing.assert_close(alone.map, together.maps[k], rtol=1e-4, atol=1e-6)
        assert alone.probabilities[0] == pytest.approx(float(np.exp(alone.score)), rel=1e-4)
    # a two-token answer sums both tokens' log-probabilities
    inputs, _ = blip.prepare(IMAGE, question)
    full, _ = blip.targets_for(inputs, ["two circles"], "logit")
    with torch.no_grad():
        logits = blip.model(**full)[0]
    lp = torch.log_softmax(logits, -1)
    ids = full["answer_ids"][0]
    expected = sum(float(lp[t - 1, ids[t]]) for t in range(1, 4))  # two, circle, ##s
    assert together.scores[1] == pytest.approx(expected, rel=1e-4)
    top = blip.answer(IMAGE, question, top_k=2)
    assert 1 <= len(top) <= 2 and top == sorted(top, key=lambda a: -a[1])
