"""Word-level scoring: metric definitions on hand-made maps, word mapping, COCO masks and bad data."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mmgradcam.eval import metrics, wordnet as wordnet_module
from mmgradcam.eval.coco import CocoData, safe_image_path
from mmgradcam.eval.words import WordMapper, load_synonyms, singular


def square_mask(shape=(60, 80), box=(10, 20, 30, 40)):
    mask = np.zeros(shape, dtype=bool)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def test_pointing_with_and_without_tolerance():
    mask = square_mask()
    heat = np.zeros(mask.shape)
    heat[15, 25] = 1.0
    assert metrics.pointing_hit(heat, mask) and metrics.pointing_hit(heat, mask, 15)
    heat = np.zeros(mask.shape)
    heat[10 + 5, 40 + 10] = 1.0  # 11 px right of the mask's last column (x = 39)
    assert not metrics.pointing_hit(heat, mask, 0)
    assert metrics.pointing_hit(heat, mask, 15) and not metrics.pointing_hit(heat, mask, 10)


def test_energy_iou_and_box():
    mask = square_mask()
    heat = np.zeros(mask.shape)
    heat[mask] = 3.0
    heat[50:55, 60:65] = 1.0  # 25 px outside with a third of the value
    inside = 3.0 * mask.sum()
    assert metrics.energy_inside(heat, mask) == pytest.approx(inside / (inside + 25))
    assert metrics.iou(metrics.threshold_region(heat), mask) == pytest.approx(400 / 425)
    # the largest connected segment is the square itself: its box is the mask's box
    assert metrics.box_iou(heat, mask) == pytest.approx(1.0)
    assert metrics.energy_inside(np.zeros(mask.shape), mask) == 0.0
    scores = metrics.score_map(heat, mask)
    assert set(scores) == set(metrics.METRICS) and scores["box_correct"] == 1.0
    with pytest.raises(ValueError, match="differs from mask shape"):
        metrics.score_map(heat[:10], mask)


def test_baselines_and_bootstrap():
    center = metrics.center_gaussian((41, 61))
    assert np.unravel_index(center.argmax(), center.shape) == (20, 30)
    a, b = metrics.uniform_random((5, 5), 3), metrics.uniform_random((5, 5), 3)
    assert np.array_equal(a, b) and not np.array_equal(a, metrics.uniform_random((5, 5), 4))
    values = [1.0] * 30 + [0.0] * 70
    mean, low, high = metrics.bootstrap_ci(values, seed=1)
    assert mean == pytest.approx(0.3) and low < 0.3 < high and high - low < 0.25
    assert metrics.bootstrap_ci(values, seed=1) == (mean, low, high)


def test_bootstrap_of_several_columns_equals_one_call_per_column():
    rng = np.random.default_rng(4)
    columns = {"energy": rng.random(333), "hit": (rng.random(333) > 0.6).astype(float), "iou": rng.random(333) ** 2}
    together = metrics.bootstrap_cis(columns, seed=2)
    assert together == {key: metrics.bootstrap_ci(values, seed=2) for key, values in columns.items()}
    assert together["hit"][1] < together["hit"][0] < together["hit"][2]
    with pytest.raises(ValueError, match="different lengths"):
        metrics.bootstrap_cis({"a": [1.0, 2.0], "b": [1.0]})


def test_function_words_are_every_other_word():
    mapper = WordMapper(["circle", "teddy bear"], colors=["red"], use_wordnet=False)
    words = "a red circle , left of the teddy bear <unk> 3".split()
    got = [(m.index, m.word, m.word_class, m.target) for m in mapper.classify(words)]
    assert got == [(0, "a", "function", "objects"), (1, "red", "color", "red"), (2, "circle", "noun", "circle"),
                   (4, "left", "function", "objects"), (5, "of", "function", "objects"),
                   (6, "the", "function", "objects"), (8, "teddy bear", "noun", "teddy bear")]
    assert mapper.classify(words, function_words=False) == mapper.map(words)


COCO_NAMES = sorted(set(load_synonyms().values()))


def test_synonyms_cover_coco_and_shapes():
    assert len(COCO_NAMES) == 85  # 80 COCO categories + 5 shapes
    mapper = WordMapper(COCO_NAMES, use_wordnet=False)
    words = "two men ride motorbikes past a fire hydrant near the bikes and a teddy bear".split()
    got = [(m.word, m.target, m.index) for m in mapper.map(words)]
    assert got == [("men", "person", 1), ("motorbikes", "motorcycle", 3), ("fire hydrant", "fire hydrant", 7),
                   ("bikes", "bicycle", 10), ("teddy bear", "teddy bear", 14)]


def test_colors_map_to_colors_when_the_data_has_them():
    mapper = WordMapper(["circle", "star"], colors=["red", "blue"], use_wordnet=False)
    got = [(m.word, m.word_class, m.target) for m in mapper.map("two red circles and a blue star".split())]
    assert got == [("red", "color", "red"), ("circles", "noun", "circle"), ("blue", "color", "blue"),
                   ("star", "noun", "star")]


def test_user_synonyms_extend_the_table(tmp_path):
    extra = tmp_path / "extra.tsv"
    extra.write_text("# mine\nblob\tcircle\n")
    mapper = WordMapper(["circle"], synonyms=load_synonyms(extra), use_wordnet=False)
    assert [m.target for m in mapper.map(["blobs"])] == ["circle"]
    extra.write_text("no tab here\n")
    with pytest.raises(ValueError, match="expected 'word<TAB>category'"):
        load_synonyms(extra)


def test_without_wordnet_a_stemmer_and_irregular_plurals(monkeypatch):
    monkeypatch.setenv("MMGRADCAM_NO_WORDNET", "1")
    wordnet_module.wordnet.cache_clear()
    try:
        assert wordnet_module.wordnet() is None
        assert [singular(w) for w in ["puppies", "knives", "buses", "women", "circles", "glass"]] == \
            ["puppy", "knife", "bus", "woman", "circle", "glass"]
        mapper = WordMapper(COCO_NAMES)
        assert [m.target for m in mapper.map("puppies and women".split())] == ["dog", "person"]
        assert mapper.map(["spaniel"]) == []  # needs WordNet
    finally:
        wordnet_module.wordnet.cache_clear()


@pytest.mark.skipif(wordnet_module.wordnet() is None, reason="WordNet data (Debian wordnet-base) not installed")
def test_with_wordnet_lemmas_and_hypernyms():
    assert singular("mice") == "mouse" and singular("geese") == "goose"
    mapper = WordMapper(COCO_NAMES)
    got = {m.word: m.target for m in mapper.map("a spaniel chases a woodpecker near a loveseat".split())}
    assert got["spaniel"] == "dog" and got["woodpecker"] == "bird"
    assert mapper.map("a an the in on of".split()) == []


def write_coco(tmp_path, images, annotations, categories=({"id": 1, "name": "circle"},)):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    (tmp_path / "img").mkdir(exist_ok=True)
    return path


def test_masks_from_polygons_rle_and_crowd_rle(tmp_path):
    mask = square_mask((30, 40), (5, 5, 15, 25))
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    compressed = {"size": rle["size"], "counts": rle["counts"].decode()}
    # uncompressed (crowd-style) RLE: column-major run lengths starting with zeros
    flat = mask.T.flatten()
    runs, current, count = [], False, 0
    for v in flat:
        if v != current:
            runs.append(count)
            current, count = v, 0
        count += 1
    runs.append(count)
    polygon = [[5, 5, 25, 5, 25, 15, 5, 15]]
    path = write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "height": 30, "width": 40}], [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygon, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": compressed, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": {"size": [30, 40], "counts": runs}, "iscrowd": 1},
    ])
    data = CocoData.load(path, tmp_path / "img")
    anns = data.annotations[1]
    assert np.array_equal(data.mask_of(anns[1], 30, 40), mask)
    assert np.array_equal(data.mask_of(anns[2], 30, 40), mask)
    assert abs(int(data.mask_of(anns[0], 30, 40).sum()) - int(mask.sum())) <= 40  # polygon rasterization
    by_category, _, skipped = data.target_masks(1, 30, 40)
    assert by_category["circle"].sum() >= mask.sum() and not skipped


def test_bad_coco_entries_are_reported_and_skipped(tmp_path):
    path = write_coco(tmp_path, [
        {"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "dup.png"},
        {"id": 2, "file_name": "../outside.png"}, {"id": 3, "file_name": "/etc/passwd"}, {"id": 4},
    ], [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 0, 0, 0, 0]]},  # zero area
        {"id": 11, "image_id": 99, "category_id": 1, "segmentation": []},
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": []},
        {"id": 12, "image_id": 1, "category_id": 7, "segmentation": []},
    ])
    data = CocoData.load(path, tmp_path / "img")
    reasons = [(s.kind, s.id, s.reason) for s in data.skipped]
    assert list(data.images) == [1]
    assert ("image", 1, "duplicate image id (first entry kept)") in reasons
    assert any(s[1] == 2 and "escapes" in s[2] for s in reasons) and any(s[1] == 3 and "escapes" in s[2] for s in reasons)
    assert any(s[0] == "image" and "lacks" in s[2] for s in reasons)
    assert any(s[1] == 11 and "unknown image" in s[2] for s in reasons)
    assert any(s[1] == 11 and "duplicate annotation" in s[2] for s in reasons)
    assert any(s[1] == 12 and "unknown category" in s[2] for s in reasons)
    _, _, skipped = data.target_masks(1, 20, 20)
    assert [(s.id, "zero-area" in s.reason) for s in skipped] == [(10, True)]


def test_missing_keys_and_paths(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['annotations', 'categories'\]"):
        CocoData.load(path, tmp_path)
    with pytest.raises(FileNotFoundError, match="--instances"):
        CocoData.load(tmp_path / "none.json", tmp_path)
    assert safe_image_path(tmp_path, "sub/x.png") == (tmp_path / "sub" / "x.png").resolve()
    assert safe_image_path(tmp_path, "../x.png") is None and safe_image_path(tmp_path, "/x.png") is None
