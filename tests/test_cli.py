"""End-to-end runs of the command line on the shipped default models."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmgradcam.data.shapes import make_image


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mmgradcam.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_demo_writes_figure_json_and_maps(tmp_path):
    result = run("demo", "--out", "demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "demo"
    for name in ["image.png", "caption.png", "result.json", "maps.npz"]:
        assert (out / name).is_file(), name
    summary = json.loads((out / "result.json").read_text())
    maps = np.load(out / "maps.npz")
    assert maps["maps"].shape == (len(summary["words"]), 128, 128)
    assert [w["word"] for w in summary["words"]] == list(maps["words"])
    assert "caption: " + summary["caption"] in result.stdout
    assert Image.open(out / "caption.png").size[0] > 400


def test_caption_given_on_a_non_square_image(tmp_path):
    pixels, objects, _ = make_image(11, seed=42, size=128)
    Image.fromarray(np.pad(pixels, ((0, 0), (20, 20), (0, 0)), mode="edge")).save(tmp_path / "wide.png")
    result = run("caption", "wide.png", "--caption", f"a {objects[0].color} {objects[0].shape}",
                 "--method", "gradcam++", "--out", "cap", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "cap" / "result.json").read_text())
    assert summary["image_size"] == [128, 168] and summary["method"] == "gradcam++"
    assert [w["word"] for w in summary["words"]] == ["a", objects[0].color, objects[0].shape]
    assert np.load(tmp_path / "cap" / "maps.npz")["maps"].shape == (3, 128, 168)


def test_vqa_top_answers_and_contrast(tmp_path):
    pixels, objects, _ = make_image(5, seed=42, size=128)
    Image.fromarray(pixels).save(tmp_path / "shapes.png")
    result = run("vqa", "shapes.png", f"is there a {objects[0].color} {objects[0].shape} ?", "--top-k", "2",
                 "--out", "v", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "v" / "result.json").read_text())
    assert len(summary["explained"]) == 2
    assert [e["answer"] for e in summary["explained"]] == [t["answer"] for t in summary["top_answers"][:2]]
    assert (tmp_path / "v" / "vqa.png").is_file()
    result = run("vqa", "shapes.png", "how many circles are there ?", "--answer", "two", "--contrast", "one",
                 "--counterfactual", "--out", "w", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    arrays = np.load(tmp_path / "w" / "maps.npz")
    assert arrays["maps"].shape == (1, 128, 128) and arrays["contrast_map"].shape == (128, 128)


def test_make_shapes(tmp_path):
    result = run("make-shapes", "--out", "s", "--num-images", "4", "--split", "val", "--seed", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    instances = json.loads((tmp_path / "s" / "instances_val.json").read_text())
    assert len(instances["images"]) == 4 and (tmp_path / "s" / "val" / "val_000004.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["caption", "missing.png"], "no such file 'missing.png'"),
    (["vqa", "img.png", "what is a zebra ?", "--answer", "maybe"], "not in the model's answer vocabulary"),
    (["caption", "img.png", "--caption", "a red zebra"], "lacks: 'zebra'"),
])
def test_errors_are_clear(tmp_path, args, message):
    Image.new("RGB", (50, 40), (10, 200, 30)).save(tmp_path / "img.png")
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
