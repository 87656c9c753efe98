"""The shapes world: deterministic, valid COCO, masks that match what was drawn, true captions."""
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmgradcam.data import shapes
from mmgradcam.eval.caption_quality import names_every_object


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    paths = shapes.write_split(out, "val", 40, seed=3)
    return out, paths


def _digest(directory):
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path, split):
    out, _ = split
    again = shapes.write_split(tmp_path / "again", "val", 40, seed=3)
    assert _digest(out) == _digest(again["images"].parent)
    other = shapes.write_split(tmp_path / "other", "val", 40, seed=4)
    assert _digest(out) != _digest(other["images"].parent)
    # splits of one seed differ from each other
    test = shapes.write_split(tmp_path / "again", "test", 40, seed=3)
    assert json.loads(test["captions"].read_text())["annotations"] != \
        json.loads(again["captions"].read_text())["annotations"]


def test_pycocotools_reads_it_and_masks_match_the_drawing(split):
    from pycocotools.coco import COCO

    out, paths = split
    coco = COCO(str(paths["instances"]))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(shapes.SHAPES)
    counts = Counter(len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds())
    assert set(counts) <= {1, 2, 3, 4} and len(counts) >= 3  # 1-4 objects, varied
    for image_id in coco.getImgIds()[:15]:
        info = coco.loadImgs(image_id)[0]
        pixels, objects, _ = shapes.make_image(image_id - 1, 3 + shapes.SPLIT_SEED_OFFSETS["val"])
        assert np.array_equal(pixels, np.asarray(Image.open(out / "val" / info["file_name"])))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(objects)
        for ann, obj in zip(anns, objects):
            mask = coco.annToMask(ann).astype(bool)
            assert ann["iscrowd"] == 0 and ann["area"] == mask.sum() > 0
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            # the mask is the drawn polygon (minus what lies on top of it)
            drawn = Image.new("L", pixels.shape[1::-1], 0)
            ImageDraw.Draw(drawn).polygon(shapes.shape_polygon(obj.shape, obj.cx, obj.cy, obj.radius, obj.angle), fill=1)
            drawn = np.asarray(drawn).astype(bool)
            assert (mask & ~drawn).sum() <= 0.05 * mask.sum()
            # and its pixels have the object's color, far from the background's gray
            mean = pixels[mask].mean(axis=0)
            assert np.abs(mean - np.array(shapes.COLORS[obj.color])).max() < 40


def test_every_caption_names_every_object(split):
    _, paths = split
    instances = json.loads(paths["instances"].read_text())
    objects = shapes.image_objects(instances)
    captions = json.loads(paths["captions"].read_text())["annotations"]
    per_image = Counter(c["image_id"] for c in captions)
    assert set(per_image.values()) == {5}
    assert len({c["caption"] for c in captions}) > 100  # varied templates
    for caption in captions:
        assert names_every_object(caption["caption"], objects[caption["image_id"]]), caption


def test_vqa_answers_are_true(split):
    _, paths = split
    instances = json.loads(paths["instances"].read_text())
    by_id = {a["id"]: a for a in instances["annotations"]}
    names = {c["id"]: c["name"] for c in instances["categories"]}
    questions = {q["question_id"]: q for q in json.loads(paths["questions"].read_text())["questions"]}
    answers = json.loads(paths["answers"].read_text())["annotations"]
    assert {a["question_type"] for a in answers} == {"color", "shape", "count", "exist", "relation"}
    for a in answers:
        q = questions[a["question_id"]]
        refs = [by_id[i] for i in a["object_ids"]]
        assert all(r["image_id"] == a["image_id"] for r in refs)
        answer = a["multiple_choice_answer"]
        if a["question_type"] == "color":
            assert refs[0]["attributes"]["color"] == answer and names[refs[0]["category_id"]] in q["question"]
        elif a["question_type"] in ("shape", "relation"):
            assert names[refs[0]["category_id"]] == answer
        elif a["question_type"] == "count":
            number = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}[answer]
            assert len(refs) == number
        elif a["question_type"] == "exist":
            assert (answer == "yes") == bool(refs)


def test_bias_confounds_an_attribute(tmp_path):
    paths = shapes.write_split(tmp_path, "train", 60, seed=1, bias={"circle": "red"})
    instances = json.loads(paths["instances"].read_text())
    circles = [a for a in instances["annotations"] if a["category_id"] == 1]
    assert circles and all(a["attributes"]["color"] == "red" for a in circles)
