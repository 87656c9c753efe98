"""The training scripts run end to end on a tiny subset (seconds), resume from checkpoints, and
produce a model the adapters load."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from mmgradcam.data.shapes import write_split

    out = tmp_path_factory.mktemp("tiny_shapes")
    write_split(out, "train", 24, seed=0)
    write_split(out, "val", 8, seed=0)
    return out


def test_train_captioner_tiny_and_resume(tiny_data, tmp_path):
    args = ["--data", str(tiny_data), "--out", str(tmp_path / "run"), "--num-train", "24", "--num-val", "8",
            "--num-test", "0", "--batch-size", "8", "--dim", "32", "--layers", "1", "--heads", "2",
            "--checkpoint-every", "2"]
    first = run_script("train_captioner.py", *args, "--steps", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_script("train_captioner.py", *args, "--steps", "4", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed from step 2" in log and "step 4/4" in log
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0.0 <= report["val"]["names_every_object"] <= 1.0 and report["val"]["images"] == 8

    from mmgradcam.tasks import captioning

    captioner = captioning.load(str(tmp_path / "run" / "model"))
    assert captioner.model.max_tokens == 24 and len(captioner.vocab) > 10


@pytest.mark.parametrize("blank", [False, True])
def test_train_vqa_tiny(tiny_data, tmp_path, blank):
    args = ["--data", str(tiny_data), "--out", str(tmp_path / "run"), "--num-train", "24", "--num-val", "8",
            "--num-test", "0", "--batch-size", "8", "--dim", "32", "--layers", "1", "--heads", "2", "--steps", "3"]
    result = run_script("train_vqa.py", *args, *(["--blank-images"] if blank else []), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["val"]["questions"] > 8 and 0.0 <= report["val"]["all"] <= 1.0

    from mmgradcam.tasks import vqa

    model = vqa.load(str(tmp_path / "run" / "model"))
    assert model.config["blank_images"] is blank and "yes" in model.answers


def test_sweep_chooses_defaults_on_val_and_the_adapters_use_them(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), "--num-train", "24", "--num-val", "8", "--num-test", "0", "--batch-size", "8",
              "--dim", "32", "--layers", "1", "--heads", "2", "--steps", "2"]
    for script, out in (("train_captioner.py", "cap"), ("train_vqa.py", "vqa")):
        result = run_script(script, *common, "--out", str(tmp_path / out), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    report = tmp_path / "sweep.json"
    sweep = run_script("sweep_localization.py", "--data", str(tiny_data), "--split", "val", "--limit", "8",
                       "--captioner", str(tmp_path / "cap" / "model"), "--vqa", str(tmp_path / "vqa" / "model"),
                       "--json", str(report), "--write-defaults", "--vqa-answers", "all", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    rows = json.loads(report.read_text())
    assert "**(chosen)**" in sweep.stdout and "| - | center |" in sweep.stdout

    from mmgradcam import available_methods
    from mmgradcam.tasks import captioning, vqa

    for task, loader, model in (("captioner", captioning, "cap"), ("vqa", vqa, "vqa")):
        layer, method = rows[task]["chosen"]
        adapter = loader.load(str(tmp_path / model / "model"))
        assert (adapter.default_layer, adapter.default_method) == (layer, method)
        assert method in available_methods() and "val split" in adapter.layer_reason
    # the trunk's blocks and the layers after it were all swept, with every method
    swept = {(r["layer"], r["method"]) for r in rows["captioner"]["rows"]}
    assert {("encoder.layer2", m) for m in available_methods()} <= swept
    # the attention methods read no layer: one row each, shown but never chosen as the default
    assert {("attention", "relevance"), ("attention", "attention-gradcam")} <= swept
    assert not any(r["method"] == "relevance" and r["layer"] != "attention" for r in rows["captioner"]["rows"])
    assert any(r["layer"].startswith("fusion.") for r in rows["vqa"]["rows"])
    # defaults are chosen on val only
    refused = run_script("sweep_localization.py", "--data", str(tiny_data), "--split", "train", "--limit", "2",
                         "--captioner", str(tmp_path / "cap" / "model"), "--vqa", "none", "--write-defaults",
                         cwd=tmp_path)
    assert refused.returncode != 0 and "val split only" in refused.stderr


def test_sweep_choice_maximizes_strict_and_tolerant_pointing_plus_energy():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from sweep_localization import choose, selection_score
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    def row(layer, method, word_class, pointing_0, pointing_15, energy):
        return {"layer": layer, "method": method, "class": word_class, "n": 10, "pointing_0px": pointing_0,
                "pointing_15px": pointing_15, "energy": energy}

    rows = [row("a", "gradcam", "shape nouns", 0.3, 0.9, 0.3), row("a", "gradcam", "colors", 0.3, 0.9, 0.3),
            row("b", "hirescam", "shape nouns", 0.7, 0.8, 0.3), row("b", "hirescam", "colors", 0.7, 0.8, 0.3),
            row("-", "center", "shape nouns", 1.0, 1.0, 1.0), row("-", "center", "colors", 1.0, 1.0, 1.0),
            row("attention", "relevance", "shape nouns", 1.0, 1.0, 1.0),
            row("attention", "relevance", "colors", 1.0, 1.0, 1.0)]
    # b's peaks land inside the object more often: 0.6 beats 0.5 though a points near it more often
    # (baselines and the layer-less attention methods are never chosen as a default layer + method)
    assert choose(rows, ("shape nouns", "colors")) == ("b", "hirescam")
    assert selection_score({"x": rows[0]}, ("x",)) == pytest.approx(0.5)
