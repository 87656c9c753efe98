"""The shapes-world checks: the out-of-domain notice (silent on shapes-world images in every form a
user may pass, present on photographs) and the demo's peak-inside-the-object check."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmgradcam.data.shapes import SPLIT_SEED_OFFSETS, ShapeObject, make_image
from mmgradcam.tasks import captioning, vqa
from mmgradcam.tasks.shapes_world import domain_check, domain_notice, shape_word_peaks

skimage_data = pytest.importorskip("skimage.data")

VAL_SEED = SPLIT_SEED_OFFSETS["val"]


def _jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


FORMS = {
    "png": lambda p: p,
    "300 px": lambda p: np.asarray(Image.fromarray(p).resize((300, 300), Image.Resampling.BICUBIC)),
    "non-square 300x180": lambda p: np.asarray(Image.fromarray(p).resize((300, 180), Image.Resampling.BILINEAR)),
    "padded to 128x176": lambda p: np.pad(p, ((0, 0), (24, 24), (0, 0)), mode="edge"),
    "jpeg q75": lambda p: _jpeg(p, 75),
}


@pytest.mark.parametrize("form", FORMS)
def test_silent_on_shapes_world_images(form):
    for index in range(12):
        pixels = FORMS[form](make_image(index, seed=VAL_SEED)[0])
        check = domain_check(pixels)
        # each statistic at least twice as far from its threshold as the calibration's worst image
        assert check.palette >= 0.004 and check.other <= 0.01 and check.gray_edge <= 0.001, (index, check)
        assert domain_notice(pixels) is None


def test_silent_on_other_shapes_world_sizes():
    for size in (64, 256):
        assert all(domain_check(make_image(i, seed=7, size=size)[0]).in_domain for i in range(6))


PHOTOS = ["astronaut", "chelsea", "coffee", "camera", "rocket", "coins", "moon", "hubble_deep_field",
          "immunohistochemistry", "retina", "stereo_motorcycle", "brick", "grass"]


@pytest.mark.parametrize("name", PHOTOS)
def test_notice_on_photographs(name):
    photo = getattr(skimage_data, name)()
    photo = photo[0] if isinstance(photo, tuple) else photo  # stereo pairs: the left image
    note = domain_notice(photo, task="captioning")
    assert note is not None and "shapes world" in note
    assert "--model" in note and "Salesforce/blip-image-captioning-base" in note
    assert "dandelin/vilt-b32-finetuned-vqa" in domain_notice(photo, task="vqa")


def test_each_statistic_names_what_is_wrong():
    camera = domain_check(skimage_data.camera())  # grayscale: no palette color at all
    assert camera.palette == 0 and camera.gray_edge > 0.1
    assert "no shape in the five palette colors" in camera.reasons
    coffee = domain_check(skimage_data.coffee())  # brown and orange: colors the palette lacks
    assert coffee.other > 0.5 and coffee.reasons == ["colors outside the palette"]
    # a shapes-world image in gray keeps its outlines but loses its colors
    gray = Image.fromarray(make_image(3, seed=VAL_SEED)[0]).convert("L")
    assert domain_check(gray).palette == 0 and not domain_check(gray).in_domain
    # a flat gray canvas: background only, no object
    assert domain_check(np.full((128, 128, 3), 128, np.uint8)).reasons == ["no shape in the five palette colors"]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage_data.chelsea())


def test_default_adapters_attach_the_notice(photo):
    shapes = make_image(4, seed=VAL_SEED)[0]
    cap = captioning.load("default")
    assert cap.explain(shapes).notice is None
    note = cap.explain(photo).notice
    assert note is not None and "default captioner" in note
    model = vqa.load("default")
    assert model.explain(shapes, "what color is the circle ?").notice is None
    note = model.explain(photo, "what color is the circle ?").notice
    assert note is not None and "default VQA model" in note and "dandelin/vilt" in note


def test_hugging_face_models_get_no_notice(photo):
    from hf_tiny import tiny_blip

    model, tokenizer, image_processor = tiny_blip()
    cap = captioning.load(model, tokenizer=tokenizer, image_processor=image_processor)
    assert cap.explain(photo, "a red circle").notice is None


# ----------------------------------------------------------------------------- demo check
def _object(shape: str, box: tuple[int, int, int, int]) -> ShapeObject:
    mask = np.zeros((40, 60), dtype=bool)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = True
    return ShapeObject(shape, "red", 0, 0, 10, 0, mask=mask)


def test_shape_word_peaks():
    objects = [_object("circle", (0, 0, 10, 10)), _object("star", (20, 30, 30, 40))]
    words = ["two", "circles", "and", "a", "star", "and", "a", "square"]
    maps = torch.zeros(len(words), 40, 60)
    maps[1, 5, 5] = 1.0  # inside the circle
    maps[4, 5, 5] = 1.0  # on the circle, not the star
    maps[7, 25, 35] = 1.0  # "square" names no object here
    peaks = shape_word_peaks(words, maps, objects)
    assert [(p.index, p.word, p.y, p.x, p.inside, p.named) for p in peaks] == [
        (1, "circles", 5, 5, True, True), (4, "star", 5, 5, False, True), (7, "square", 25, 35, False, False)]
