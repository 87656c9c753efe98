"""The shipped default models do what the README says, on shapes-world images drawn with a seed the
project never trained, chose defaults or reported on: captions name the objects, answers are right,
and the maps of the default method at the default layer land on what the word or answer names
(Grad-CAM does not on this captioner: README, "Localization before and after")."""
import random

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mmgradcam.data.shapes import PLURALS, make_image, questions_for
from mmgradcam.tasks import captioning, vqa

UNSEEN_SEED = 31_337  # not a split seed (train 0, val 1_000_003, test 2_000_003) nor the demo's
IMAGES = 24
TOLERANCE_PX = 15
SINGULAR = {plural: shape for shape, plural in PLURALS.items()} | {shape: shape for shape in PLURALS}


@pytest.fixture(scope="module")
def world():
    """(pixels, objects, questions) of fresh images; objects carry their visible masks."""
    scenes = []
    for index in range(IMAGES):
        pixels, objects, _ = make_image(index, seed=UNSEEN_SEED, size=128)
        for number, obj in enumerate(objects):
            obj.id = number
        scenes.append((Image.fromarray(pixels), objects, questions_for(objects, random.Random(index))))
    return scenes


def points_into(heatmap, mask) -> bool:
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(ndimage.distance_transform_edt(~mask)[y, x] <= TOLERANCE_PX)


@pytest.fixture(scope="module")
def caption_results(world):
    captioner = captioning.load("default")
    return captioner, captioner.explain_batch([image for image, _, _ in world], None,
                                              method=captioner.default_method)


def test_captions_name_the_objects(world, caption_results):
    _, results = caption_results
    named = [set(SINGULAR.get(w) for w in r.words) >= {o.shape for o in objects}
             for (_, objects, _), r in zip(world, results)]
    assert np.mean(named) >= 0.8


def test_caption_maps_land_on_the_named_shape_and_color(world, caption_results):
    captioner, results = caption_results
    name = captioner.default_method
    hits = {"shape": [], "color": []}
    for (_, objects, _), r in zip(world, results):
        maps = r.for_method(name).maps.numpy()
        for j, word in enumerate(r.words):
            shape_ids = [o for o in objects if o.shape == SINGULAR.get(word)]
            color_ids = [o for o in objects if o.color == word]
            for kind, named in (("shape", shape_ids), ("color", color_ids)):
                if named:
                    hits[kind].append(points_into(maps[j], np.any([o.mask for o in named], axis=0)))
    assert len(hits["shape"]) >= 40 and len(hits["color"]) >= 40
    # measured: shape nouns 1.00, colors 0.96 (HiResCAM at encoder.layer1)
    assert np.mean(hits["shape"]) >= 0.9, f"{name}: shape nouns {np.mean(hits['shape']):.2f}"
    assert np.mean(hits["color"]) >= 0.88, f"{name}: colors {np.mean(hits['color']):.2f}"


def test_vqa_answers_and_their_maps_land_on_the_referred_objects(world):
    model = vqa.load("default")
    correct, hits, center_hits = [], [], []
    center = np.zeros((128, 128))
    center[64, 64] = 1.0
    for image, objects, questions in world:
        for q in questions:
            r = model.explain(image, q["question"])
            correct.append(r.answer == q["answer"])
            if correct[-1] and q["object_ids"] and r.answer not in ("no", "zero"):
                mask = np.any([objects[i].mask for i in q["object_ids"]], axis=0)
                hits.append(points_into(r.map.numpy(), mask))
                center_hits.append(points_into(center, mask))
    # measured: accuracy 0.93; answer maps 0.98 against 0.29 for the image center
    assert len(correct) >= 80 and np.mean(correct) >= 0.88
    assert len(hits) >= 40 and np.mean(hits) >= 0.88 and np.mean(hits) >= np.mean(center_hits) + 0.4
