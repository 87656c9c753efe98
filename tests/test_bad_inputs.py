"""Bad input gets a clear error naming the input, or is handled (and what the user sees is right)."""
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mmgradcam.data.shapes import make_image
from mmgradcam.tasks import captioning, checkpoints, vqa
from mmgradcam.tasks.geometry import load_image


@pytest.fixture(scope="module")
def captioner():
    return captioning.load("default")


@pytest.fixture(scope="module")
def answerer():
    return vqa.load("default")


@pytest.fixture(scope="module")
def shapes_image():
    return Image.fromarray(make_image(3, seed=21)[0])


def test_corrupt_truncated_and_non_images(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png, format="PNG")
    (tmp_path / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (tmp_path / "text.png").write_text("hello, I am not an image")
    for name in ["truncated.png", "text.png"]:
        with pytest.raises(ValueError, match=f"{name}' is not a readable image"):
            load_image(tmp_path / name, what="IMAGE")
    with pytest.raises(FileNotFoundError, match="IMAGE: no such file"):
        load_image(tmp_path / "missing.png", what="IMAGE")
    with pytest.raises(ValueError, match="expected an \\(H, W\\)"):
        load_image(np.zeros((4, 4, 7)))
    with pytest.raises(TypeError, match="expected a path, PIL image"):
        load_image(42)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "1"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    base = Image.new("RGB", (30, 20), (200, 30, 30))
    image = base.convert("I;16") if mode == "I;16" else base.convert(mode)
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (30, 20)


def test_transparent_pixels_are_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_tiny_and_huge_images(captioner, tmp_path):
    result = captioner.explain(Image.new("RGB", (1, 1), (200, 0, 0)), "a red circle")
    assert result.maps.shape == (3, 1, 1)
    Image.new("RGB", (12000, 9000), (90, 90, 90)).save(tmp_path / "huge.jpg", quality=40)
    with pytest.warns(UserWarning, match="12000x9000 pixels decoded at"):
        image = load_image(tmp_path / "huge.jpg")
    assert max(image.size) <= 4096
    assert captioner.explain(image, "a red circle").maps.shape[1:] == (image.height, image.width)


def test_exif_rotation_is_respected(captioner, tmp_path, shapes_image):
    wide = shapes_image.crop((0, 0, 128, 80))  # 128 x 80, landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    wide.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    shown = load_image(tmp_path / "rotated.jpg")
    assert shown.size == (80, 128)  # as a person sees it: portrait
    result = captioner.explain(tmp_path / "rotated.jpg", "a red circle")
    assert result.maps.shape[1:] == (128, 80)


@pytest.mark.parametrize("caption, message", [
    ("", "is empty"), ("   ", "is empty"), (" , , ", "is empty"),
    ("a red zebra", "lacks: 'zebra'"), ("a café", "lacks"),
    (" ".join(["red"] * 40), "limit is 23"),
])
def test_bad_captions(captioner, shapes_image, caption, message):
    with pytest.raises(ValueError, match=message):
        captioner.explain(shapes_image, caption)


@pytest.mark.parametrize("question, message", [
    ("", "is empty"), ("?!", "is empty"), ("zebra quokka", "only words the model does not know"),
    ("what " * 30, "limit is 16"),
])
def test_bad_questions(answerer, shapes_image, question, message):
    with pytest.raises(ValueError, match=message):
        answerer.explain(shapes_image, question)


def test_non_ascii_and_unknown_words_in_a_question_warn(answerer, shapes_image):
    with pytest.warns(UserWarning, match="unknown words mapped to <unk>: zürich"):
        result = answerer.explain(shapes_image, "what color is the zürich ?")
    assert result.map.shape == (128, 128)


def test_word_index_and_answer_out_of_range(captioner, answerer, shapes_image):
    result = captioner.explain(shapes_image, "a red circle")
    assert torch.equal(result.word_map(2), result.word_map("circle"))
    with pytest.raises(IndexError, match="word index 3 is out of range: the caption has 3 words"):
        result.word_map(3)
    with pytest.raises(KeyError, match="'star' is not in the caption"):
        result.word_map("star")
    with pytest.raises(ValueError, match="'maybe' is not in the model's answer vocabulary"):
        answerer.explain(shapes_image, "what color is the circle ?", answer="maybe")


def test_bad_layers(captioner, shapes_image):
    with pytest.raises(ValueError, match="'encoder.layer22' is not a submodule.*Close names: encoder.layer2"):
        captioner.explain(shapes_image, "a red circle", layer="encoder.layer22")
    captioner.model.unused_head = torch.nn.Linear(2, 2)
    try:
        with pytest.raises(RuntimeError, match="was never called"):
            captioner.explain(shapes_image, "a red circle", layer="unused_head")
    finally:
        del captioner.model.unused_head


def test_checkpoints_that_are_not_safetensors_are_refused(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text((checkpoints.packaged("captioner") / "config.json").read_text())
    (directory / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))  # a pickle in disguise
    with pytest.raises(ValueError, match="is not a safetensors file"):
        captioning.load(str(directory))
    torch.save({"x": torch.zeros(1)}, directory / "model.safetensors")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        captioning.load(str(directory))


def test_config_that_does_not_match_the_weights(tmp_path):
    import json
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(checkpoints.packaged("captioner"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["dim"] = 64
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the model its config describes|wrong shape"):
        captioning.load(str(directory))
