"""`mmgradcam eval` with several methods from one pass: per-method lines equal single-method runs,
the method x word class table, function words against the union of all objects, resume after a
kill, and the model-randomization flag."""
import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mmgradcam.data.shapes import COLORS, SHAPES, write_split
from mmgradcam.eval import faithfulness
from mmgradcam.eval.coco import CocoData
from mmgradcam.eval.metrics import bootstrap_ci, center_gaussian, score_map, uniform_random
from mmgradcam.eval.pipeline import EvalConfig, Evaluation, _word_seed
from mmgradcam.eval.summary import markdown_tables
from test_eval_pipeline import ANSWERS, QUESTION_WORDS
from tiny import tiny_captioner, tiny_vqa

METHODS = ["gradcam", "hirescam"]
# the captioner's own captions then hold function words too (a random model favours what it is told)
FAVOR = tuple(COLORS) + tuple(SHAPES) + ("a", "and", "the", "left", "of")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    paths = write_split(root / "data", "test", 6, seed=9)
    return {"root": root, "paths": paths,
            "captioner": tiny_captioner(root / "captioner", favor=FAVOR, max_tokens=20, seed=2),
            "vqa": tiny_vqa(root / "vqa", QUESTION_WORDS, ANSWERS)}


def config(setup, out, method, **extra):
    p = setup["paths"]
    return EvalConfig(instances=str(p["instances"]), images=str(p["images"]), out=str(out),
                      captions=str(p["captions"]), questions=str(p["questions"]), answers=str(p["answers"]),
                      model=str(setup["captioner"]), vqa_model=str(setup["vqa"]), method=method, batch_size=2,
                      references=True, **extra)


def cli_args(setup, out, method):
    p = setup["paths"]
    return ["eval", "--instances", str(p["instances"]), "--captions", str(p["captions"]), "--images", str(p["images"]),
            "--questions", str(p["questions"]), "--answers", str(p["answers"]), "--model", str(setup["captioner"]),
            "--vqa-model", str(setup["vqa"]), "--method", method, "--batch-size", "2", "--references", "--quiet",
            "--out", str(out)]


def read_lines(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(setup):
    """One run with both methods (counting the explain calls) and one run per method alone."""
    root = setup["root"]
    evaluation = Evaluation(config(setup, root / "both", ",".join(METHODS)), progress=False)
    calls = {"captions": [], "vqa": []}
    captioner, vqa_model = evaluation.captioner, evaluation.vqa
    # the loop explains preprocessed pixels (decoded ahead by its loader): explain_pixels
    explain_pixels, explain = captioner.explain_pixels, vqa_model.explain
    captioner.explain_pixels = lambda *a, **k: calls["captions"].append(k["method"]) or explain_pixels(*a, **k)
    vqa_model.explain = lambda *a, **k: calls["vqa"].append(k["method"]) or explain(*a, **k)
    evaluation.run()
    alone = {}
    for method in [None, "hirescam"]:  # None: the model's default method (gradcam for the tiny models)
        out = root / f"alone-{method}"
        Evaluation(config(setup, out, method), progress=False).run()
        alone[method or "gradcam"] = out
    return {"both": root / "both", "alone": alone, "calls": calls, "batches": len(evaluation.batches)}


def test_each_method_lines_equal_a_single_method_run(runs):
    lines = read_lines(runs["both"])
    assert [line["method"] for line in lines[:2]] == METHODS  # a word's methods are adjacent
    for method in METHODS:
        mine = [line for line in lines if line["method"] == method]
        alone = read_lines(runs["alone"][method])
        assert {line["method"] for line in alone} == {method}
        assert len(mine) == len(alone) > 0 and mine == alone
    # the baselines are computed once per word: the same on both methods' lines
    for first, second in zip(lines[::2], lines[1::2]):
        assert (first["word_index"] if first["kind"] == "word" else first["question_id"]) == \
            (second["word_index"] if second["kind"] == "word" else second["question_id"])
        assert first["center"] == second["center"] and first["random"] == second["random"]
    assert any(a["model"] != b["model"] for a, b in zip(lines[::2], lines[1::2]))  # the maps differ
    # ONE explain_pixels call per batch and ONE vqa.explain call per question, for both methods
    assert runs["calls"]["captions"] == [METHODS] * runs["batches"]
    questions = {line["question_id"] for line in lines if line["kind"] == "answer"}
    assert len(runs["calls"]["vqa"]) >= len(questions) > 0 and all(m == METHODS for m in runs["calls"]["vqa"])


def test_method_table_has_every_class_with_both_baselines(runs):
    summary = json.loads((runs["both"] / "summary.json").read_text())
    lines = read_lines(runs["both"])
    table = summary["method_table"]
    assert table["classes"] == ["noun", "color", "function", "answer"]
    assert list(table["methods"]) == METHODS and summary["methods"] == {"captions": METHODS, "vqa": METHODS}
    for word_class in table["classes"]:
        if word_class == "answer":
            rows = [line for line in lines if line["kind"] == "answer"]
        else:
            rows = [line for line in lines if line.get("class") == word_class and line["source"] == "generated"]
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method]
            cell = table["methods"][method][word_class]
            assert cell["n"] == len(mine) > 0
            for metric in ("pointing_0px", "pointing_15px", "energy", "iou_15"):
                assert cell[metric] == list(bootstrap_ci([r["model"][metric] for r in mine]))
        first = [r for r in rows if r["method"] == METHODS[0]]
        baselines = table["baselines"][word_class]
        assert baselines["n"] == len(first)
        for who in ("center", "random"):
            assert baselines[who]["energy"] == list(bootstrap_ci([r[who]["energy"] for r in first]))
    # the per-class and per-category tables stay (first method), "all" = object words only
    generated = summary["captions"]["generated"]
    assert set(generated) == {"noun", "color", "function", "all"}
    assert generated["all"]["n"] == generated["noun"]["n"] + generated["color"]["n"]
    assert summary["words_scored"] == sum(1 for line in lines if line["kind"] == "word" and line["method"] == "gradcam")
    assert all(not key.startswith("function") for key in summary["per_category"]["generated"])
    markdown = (runs["both"] / "summary.md").read_text()
    assert markdown.count("| *center baseline* |") == 4 and markdown.count("| *random baseline* |") == 4
    assert "| function words (vs all objects) | hirescam |" in markdown
    assert markdown_tables(summary) == markdown


def test_function_words_are_scored_against_the_union_of_all_objects(setup, runs):
    lines = [line for line in read_lines(runs["both"]) if line["kind"] == "word" and line["method"] == "hirescam"]
    data = CocoData.load(setup["paths"]["instances"], setup["paths"]["images"])
    function = [line for line in lines if line["class"] == "function"]
    assert {line["source"] for line in function} == {"generated", "reference"}
    assert {"a", "the"} <= {line["word"] for line in function} and all(line["target"] == "objects" for line in function)
    from mmgradcam.tasks import captioning

    captioner = captioning.load(str(setup["captioner"]))
    discriminating = 0
    for line in function[:12]:
        image = Image.open(data.images[line["image_id"]]["path"]).convert("RGB")
        by_category, _, _ = data.target_masks(line["image_id"], image.height, image.width)
        union = np.any(list(by_category.values()), axis=0)
        seed = _word_seed(0, line["image_id"], line["source"], line["word_index"])
        assert line["center"] == score_map(center_gaussian(union.shape), union)
        assert line["random"] == score_map(uniform_random(union.shape, seed), union)
        heatmap = captioner.explain(image, line["caption"], method="hirescam").maps[line["word_index"]].numpy()
        expected = score_map(heatmap, union)
        assert line["model"]["energy"] == pytest.approx(expected["energy"], abs=1e-5)
        assert line["model"]["iou_15"] == pytest.approx(expected["iou_15"], abs=1e-3)
        # against any single category's mask the scores would differ (the test can tell)
        if len(by_category) > 1:
            discriminating += all(score_map(heatmap, m)["energy"] != pytest.approx(expected["energy"], abs=1e-5)
                                  for m in by_category.values())
    assert discriminating > 0


def test_resume_after_kill_with_several_methods_gives_the_same_results(setup, runs, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "mmgradcam.cli", *cli_args(setup, out, ",".join(METHODS))]
    shard = out / "shards" / "rank000.jsonl"
    rng = random.Random(3)
    for _ in range(2):  # kill -9 twice, inside a batch or while it is written
        process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wanted = (shard.read_text().count('"batch_done"') if shard.is_file() else 0) + 1
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if (shard.read_text().count('"batch_done"') if shard.is_file() else 0) >= wanted:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
    done_before = shard.read_text().count('"batch_done"')
    assert 0 < done_before < runs["batches"]  # killed part-way, with work left to resume
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (out / "results.jsonl").read_text() == (runs["both"] / "results.jsonl").read_text()
    assert json.loads((out / "summary.json").read_text())["method_table"] == \
        json.loads((runs["both"] / "summary.json").read_text())["method_table"]


def test_eval_report_shows_the_method_table_and_first_method_words(runs):
    from mmgradcam.report.build import build_report
    from mmgradcam.report.eval_report import first_method_lines

    html = build_report(runs["both"]).read_text()
    assert "id='methods'" in html and html.count("<i>center baseline</i>") == 4
    lines = read_lines(runs["both"])
    first = first_method_lines(lines)
    assert len(first) * 2 == len(lines) and {line["method"] for line in first} == {"gradcam"}
    table = html[html.index("id='words'"):]
    assert table.count("<tr>") == len(first) + 1  # header + one row per first-method word or answer
    assert (runs["both"] / "plots" / "methods.png").is_file()


# ----------------------------------------------------------------------------- sanity flag
class _Result:
    def __init__(self, caption, maps):
        self.caption, self.words = caption, caption.split()
        self.method_maps = {name: (m, m, m[0]) for name, m in maps.items()}


class StubCaptioner:
    """"gradcam" maps come from the image alone (an edge detector); "hirescam" maps are read from
    the model's weights. Only the second should pass the randomization check."""

    default_method = "gradcam"

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))

    def explain_batch(self, images, captions=None, method=None, layer=None):
        results = []
        for image in images:
            pixels = torch.from_numpy(np.asarray(image.convert("L").resize((16, 16)), dtype=np.float32))
            with torch.no_grad():
                from_weights = self.model(pixels.reshape(1, 256)).reshape(16, 16)
            maps = {"gradcam": pixels[None].repeat(2, 1, 1), "hirescam": from_weights[None].repeat(2, 1, 1)}
            results.append(_Result("a circle", {name: maps[name] for name in method}))
        return results


def test_randomization_flags_maps_that_survive_randomized_weights():
    images = [Image.fromarray(np.random.default_rng(k).integers(0, 255, (8, 8, 3), dtype=np.uint8)) for k in range(3)]
    study = faithfulness.randomization_study(StubCaptioner(), images, method="gradcam,hirescam")
    assert study["threshold"] == faithfulness.SANITY_THRESHOLD == 0.2
    edge, model = study["methods"]["gradcam"], study["methods"]["hirescam"]
    assert edge["final_mean_abs_spearman"] == pytest.approx(1.0) and edge["flagged"]
    assert model["final_mean_abs_spearman"] < faithfulness.SANITY_THRESHOLD and not model["flagged"]
    assert study["flagged"] == ["gradcam"] and study["stages"] == edge["stages"]
    # the flag reaches the method table and its markdown
    from mmgradcam.eval.summary import add_sanity_flags, method_table

    line = {"kind": "word", "source": "generated", "class": "noun", "model": {m: 1.0 for m in
            ("pointing_0px", "pointing_15px", "energy", "iou_15")}}
    line["center"] = line["random"] = line["model"]
    table = method_table([{**line, "method": "gradcam"}, {**line, "method": "hirescam"}], [])
    add_sanity_flags(table, study)
    assert table["sanity"]["gradcam"]["flagged"] and not table["sanity"]["hirescam"]["flagged"]
    markdown = markdown_tables({"images": 1, "words_scored": 1, "answers_scored": 0, "skipped": [], "captions": {},
                                "per_category": {}, "methods": {"captions": ["gradcam", "hirescam"]},
                                "method_table": table, "sanity": study})
    assert "| gradcam ⚠ |" in markdown and "| hirescam |" in markdown
    assert "| gradcam | 1.00 | 1.00 | 1.00 | 1.00 | **yes** ⚠ |" in markdown
