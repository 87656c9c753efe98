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
