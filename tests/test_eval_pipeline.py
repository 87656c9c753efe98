"""`mmgradcam eval` end to end on tiny models: outputs, resume after kill -9, torchrun sharding,
bad data reported and skipped."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mmgradcam.data.shapes import COLORS, NUMBER_WORDS, PLURALS, SHAPES, write_split
from tiny import tiny_captioner, tiny_vqa

QUESTION_WORDS = ["what", "color", "is", "the", "shape", "object", "how", "many", "are", "there", "a", "?", "left",
                  "right", "of", "above", "below"] + list(COLORS) + list(SHAPES) + list(PLURALS.values())
ANSWERS = sorted(list(COLORS) + list(SHAPES) + ["yes", "no", "zero"] + list(NUMBER_WORDS.values()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = write_split(root / "data", "test", 12, seed=5)
    return {"root": root, "paths": paths, "captioner": tiny_captioner(root / "captioner"),
            "vqa": tiny_vqa(root / "vqa", QUESTION_WORDS, ANSWERS)}


def eval_args(setup, out, *extra):
    p = setup["paths"]
    return ["eval", "--instances", str(p["instances"]), "--captions", str(p["captions"]), "--images", str(p["images"]),
            "--model", str(setup["captioner"]), "--batch-size", "2", "--quiet", "--out", str(out), *extra]


def run_cli(args, cwd, **kwargs):
    return subprocess.run([sys.executable, "-m", "mmgradcam.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.fixture(scope="module")
def reference_run(setup):
    out = setup["root"] / "reference"
    result = run_cli(eval_args(setup, out, "--references"), cwd=setup["root"])
    assert result.returncode == 0, result.stderr
    return out


def test_outputs(reference_run):
    lines = [json.loads(line) for line in (reference_run / "results.jsonl").read_text().splitlines()]
    assert lines and {line["source"] for line in lines} == {"generated", "reference"}
    for line in lines:
        assert line["class"] in ("noun", "color", "function") and line["method"] == "gradcam"  # the model's default
        assert set(line) >= {"model", "center", "random", "word", "target"}
        assert 0.0 <= line["model"]["energy"] <= 1.0
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["images"] == 12 and summary["words_scored"] == len(lines) and summary["incomplete_batches"] == 0
    reference_nouns = summary["captions"]["reference"]["noun"]
    assert reference_nouns["n"] > 12  # every reference caption names its shapes
    mean, low, high = reference_nouns["pointing_15px"]["center"]
    assert low <= mean <= high
    assert "| noun |" in (reference_run / "summary.md").read_text()
    assert (reference_run / "plots" / "distributions.png").is_file()


def test_kill_and_resume_gives_the_uninterrupted_results(setup, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "mmgradcam.cli", *eval_args(setup, out, "--references")]
    rng = random.Random(7)
    shard = out / "shards" / "rank000.jsonl"
    for attempt in range(3):  # kill -9 three times, at random moments
        process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = shard.read_text().count('"batch_done"') if shard.is_file() else 0
        wanted = done + rng.randint(0, 1)
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if (shard.read_text().count('"batch_done"') if shard.is_file() else 0) >= wanted:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside the next batch, or while writing it
        process.send_signal(signal.SIGKILL)
        process.wait()
    with shard.open("a") as handle:
        handle.write('{"kind": "word", "batch": 9, "trunc')  # a torn last line, as a kill mid-write leaves
    result = run_cli(eval_args(setup, out, "--references"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "results.jsonl").read_text() == (reference_run / "results.jsonl").read_text()
    done = [json.loads(line)["batch"] for line in shard.read_text().splitlines() if '"batch_done"' in line]
    assert sorted(done) == list(range(6)) and len(done) == len(set(done))


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``, read from /proc."""
    found = set()
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(stat))
    return found


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the kernel's parent-death signal")
def test_no_decoding_worker_outlives_a_killed_run(setup, tmp_path):
    """kill -9 of an eval with decoding workers: every worker is gone at once (within 2 s; the
    DataLoader's own parent check alone takes up to 5 s, or never for a worker blocked on a full queue)."""
    args = [sys.executable, "-m", "mmgradcam.cli", *eval_args(setup, tmp_path / "run", "--references", "--workers", "2")]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and len(workers) < 2:
        workers = children_of(process.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the run finished or failed before its two workers started"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 2.0
    while time.time() < deadline and any(alive(w) for w in workers):
        time.sleep(0.05)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)  # leave nothing behind, then fail
    assert not left, f"decoding workers {left} outlived the killed run"


def test_torchrun_two_processes_merge_to_the_same_results(setup, reference_run, tmp_path):
    out = tmp_path / "sharded"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                "-m", "mmgradcam.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(torchrun + eval_args(setup, out, "--references"), cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank000.jsonl", "rank001.jsonl"]
    assert (out / "results.jsonl").read_text() == (reference_run / "results.jsonl").read_text()


def test_other_arguments_do_not_resume(setup, reference_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    result = run_cli(eval_args(setup, out, "--method", "hirescam"), cwd=tmp_path)
    assert result.returncode == 2 and "holds a run with other arguments" in result.stderr


def test_bad_data_is_reported_and_skipped(setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(setup["paths"]["images"].parent, data)
    instances = json.loads((data / "instances_test.json").read_text())
    images = instances["images"]
    (data / "test" / images[0]["file_name"]).unlink()  # missing file
    (data / "test" / images[1]["file_name"]).write_bytes(b"not an image at all")  # unreadable
    images[2]["file_name"] = "../../outside.png"  # escapes the image directory
    instances["annotations"].append({"id": 999, "image_id": 4242, "category_id": 1, "segmentation": []})
    first_ann = next(a for a in instances["annotations"] if a["image_id"] == images[3]["id"])
    first_ann["segmentation"] = [[1, 1, 1, 1, 1, 1]]  # zero area
    (data / "instances_test.json").write_text(json.dumps(instances))
    out = tmp_path / "out"
    args = ["eval", "--instances", str(data / "instances_test.json"), "--captions", str(data / "captions_test.json"),
            "--images", str(data / "test"), "--model", str(setup["captioner"]), "--batch-size", "3", "--quiet",
            "--out", str(out)]
    before = set(tmp_path.iterdir())
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    skipped = json.loads((out / "summary.json").read_text())["skipped"]
    reasons = {(s["kind"], s["id"]): s["reason"] for s in skipped}
    assert "no such file" in reasons[("image", images[0]["id"])]
    assert "not a readable image" in reasons[("image", images[1]["id"])]
    assert "escapes" in reasons[("image", images[2]["id"])]
    assert "unknown image" in reasons[("annotation", 999)]
    assert "zero-area" in reasons[("annotation", first_ann["id"])]
    assert set(tmp_path.iterdir()) == before | {out}  # nothing written beside --out


def test_vqa_eval_scores_answers(setup, tmp_path):
    p = setup["paths"]
    out = tmp_path / "vqa"
    result = run_cli(["eval", "--instances", str(p["instances"]), "--questions", str(p["questions"]), "--answers",
                      str(p["answers"]), "--images", str(p["images"]), "--vqa-model", str(setup["vqa"]), "--limit", "4",
                      "--quiet", "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines and all(line["kind"] == "answer" for line in lines)
    assert {line["image_id"] for line in lines} <= {1, 2, 3, 4}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vqa"]["all"]["n"] == len(lines) and 0 <= summary["vqa"]["all"]["accuracy"] <= 1


def test_sanity_and_faithfulness_studies(setup, tmp_path):
    out = tmp_path / "studies"
    result = run_cli(eval_args(setup, out, "--limit", "2", "--sanity-images", "2", "--faithfulness-images", "1"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["sanity"]["stages"]
    assert [s["randomized_fraction"] for s in stages] == [0.25, 0.5, 0.75, 1.0]
    assert all(s["mean_abs_spearman"] is None or 0 <= s["mean_abs_spearman"] <= 1 for s in stages)
    faith = summary["faithfulness"]
    assert faith["words"] > 0 and all(0 <= faith[k] <= 1 for k in faith if k.endswith(("_map", "_random")))
