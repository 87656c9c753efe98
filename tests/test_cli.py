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


def test_caption_method_all_writes_every_methods_maps_from_one_pass(tmp_path):
    import mmgradcam as mg
    from mmgradcam.tasks import captioning

    pixels, objects, _ = make_image(3, seed=42, size=128)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    caption = f"a {objects[0].color} {objects[0].shape}"
    result = run("caption", "img.png", "--caption", caption, "--method", "all", "--html", "--out", "all", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "all" / "result.json").read_text())
    arrays = np.load(tmp_path / "all" / "maps.npz")
    # "all": every method that applies to the model (the default captioner's decoder attends to the grid)
    every = mg.available_methods() + ["attention-gradcam", "relevance"]
    assert summary["methods"] == every and summary["method"] == mg.available_methods()[0]
    for name in every:
        assert arrays[f"maps@{name}"].shape == (3, 128, 128)
    np.testing.assert_array_equal(arrays["maps"], arrays[f"maps@{summary['method']}"])
    assert not np.allclose(arrays["maps@gradcam"], arrays["maps@layercam"])
    # the same maps as a run of that method alone; no --method: the model's own default method
    captioner = captioning.load("default")
    alone = captioner.explain(Image.open(tmp_path / "img.png"), caption, method="hirescam")
    np.testing.assert_allclose(arrays["maps@hirescam"], alone.maps.numpy(), rtol=0, atol=1e-6)
    result = run("caption", "img.png", "--caption", caption, "--out", "plain", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "plain" / "result.json").read_text())["method"] == captioner.default_method
    html = (tmp_path / "all" / "report.html").read_text()
    assert all(f'<option value="{name}">' in html for name in mg.available_methods())
    # "all" with a second figure row (--compare-method) is still every method from the one pass
    from mmgradcam.cli import main

    assert main(["caption", str(tmp_path / "img.png"), "--caption", caption, "--method", "all",
                 "--compare-method", "hirescam", "--out", str(tmp_path / "both")]) == 0
    assert json.loads((tmp_path / "both" / "result.json").read_text())["methods"] == every


def test_vqa_several_methods_write_maps_per_method_and_a_method_switch(tmp_path):
    pixels, objects, _ = make_image(5, seed=42, size=128)
    Image.fromarray(pixels).save(tmp_path / "shapes.png")
    result = run("vqa", "shapes.png", "how many circles are there ?", "--answer", "two", "--contrast", "one",
                 "--method", "gradcam,layercam", "--html", "--out", "v", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "v" / "result.json").read_text())
    arrays = np.load(tmp_path / "v" / "maps.npz")
    assert summary["methods"] == ["gradcam", "layercam"]
    for name in ("gradcam", "layercam"):
        assert arrays[f"maps@{name}"].shape == (1, 128, 128) and arrays[f"contrast_map@{name}"].shape == (128, 128)
    np.testing.assert_array_equal(arrays["maps"], arrays["maps@gradcam"])
    np.testing.assert_array_equal(arrays["contrast_map"], arrays["contrast_map@gradcam"])
    assert not np.allclose(arrays["maps@gradcam"], arrays["maps@layercam"])
    html = (tmp_path / "v" / "report.html").read_text()
    assert '<select class="method"><option value="gradcam">gradcam</option><option value="layercam">' in html


def test_method_help_lists_the_registry_and_all(capsys):
    import mmgradcam as mg
    from mmgradcam.cli import build_parser

    for command in ("caption", "vqa", "eval", "compare", "adversarial"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "'all'" in text and "default: the model's own default method" in text, command
        assert all(name in text for name in mg.available_methods()), command
        # issue 13: Guided Grad-CAM is one registered method that every command takes (it used to
        # be captioning's alone, so only caption's help listed it)
        assert all(name in text for name in mg.available_methods(pixel=True)) and "guided-gradcam" in text, command
    assert build_parser().parse_args(["eval", "--instances", "i", "--images", "d", "--out", "o"]).method is None


def test_method_help_lists_a_method_registered_at_test_time(capsys, monkeypatch):
    """Help texts read the registry: a method registered now is listed, no list to edit."""
    from mmgradcam.cli import build_parser
    from mmgradcam.engine import registry

    class Probe(registry.CAMMethod):
        name = "probecam"

        def weights(self, activations, gradients):
            return gradients.mean(dim=(-2, -1), keepdim=True)

    monkeypatch.setitem(registry._REGISTRY, Probe.name, Probe())
    for command in ("caption", "vqa", "eval", "compare", "adversarial"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert "probecam" in capsys.readouterr().out, command
