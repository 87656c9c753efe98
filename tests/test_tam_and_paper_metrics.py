"""TAM (method="tam", GIT) and the metrics the recent papers report: TAM's Obj-IoU / Func-IoU /
F1-IoU on hand-made maps, Chefer's perturbation AUCs on a toy VQA model whose answer depends on one
known region, and a tiny eval run carrying them into results, summary and report."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hf_tiny import tiny_git
from mmgradcam.eval import metrics
from mmgradcam.eval.faithfulness import perturbation_study
from mmgradcam.methods.tam import causal_correction, rank_gaussian
from mmgradcam.tasks import captioning, vqa

IMAGE = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))


# ----------------------------------------------------------------------------- Obj-IoU / Func-IoU / F1-IoU
def test_obj_iou_is_the_best_iou_over_the_threshold_grid():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    heat = np.zeros((10, 10))
    heat[:5, :5] = 1.0   # the object
    heat[5:, 5:] = 0.5   # a weaker blob elsewhere
    # thresholds <= 0.5 take both blobs (IoU 25/50), above 0.5 only the object (IoU 1)
    assert metrics.obj_iou(heat, mask) == 1.0
    half = np.zeros((10, 10))
    half[:5, :] = 1.0    # twice the object at every threshold
    assert metrics.obj_iou(half, mask) == pytest.approx(0.5)
    assert metrics.obj_iou(np.zeros((10, 10)), mask) == 0.0
    assert metrics.PAPER_THRESHOLDS[0] == 0.05 and metrics.PAPER_THRESHOLDS[-1] == 0.95
    assert len(metrics.PAPER_THRESHOLDS) == 19


def test_func_iou_is_the_mean_lit_share():
    assert metrics.func_iou(np.zeros((8, 8))) == 0.0      # nothing lights up
    quarter = np.zeros((8, 8))
    quarter[:4, :4] = 3.0
    assert metrics.func_iou(quarter) == pytest.approx(0.25)  # a quarter lit at every threshold
    ramp = np.tile(np.linspace(0, 1, 101), (3, 1))         # value v lit at thresholds <= v
    expected = np.mean([(np.linspace(0, 1, 101) >= t - 1e-12).mean() for t in metrics.PAPER_THRESHOLDS])
    assert metrics.func_iou(ramp) == pytest.approx(expected, abs=1e-9)


def test_f1_iou_and_the_table_entries():
    assert metrics.f1_iou(1.0, 0.0) == 1.0
    assert metrics.f1_iou(0.5, 0.5) == pytest.approx(0.5)
    assert metrics.f1_iou(0.6, 0.8) == pytest.approx(2 * 0.6 * 0.2 / 0.8)
    assert metrics.f1_iou(0.0, 1.0) == 0.0
    assert metrics.metric_keys()[-2:] == ("obj_iou", "func_iou")  # appended after the built-ins
    mask = np.zeros((6, 6), bool)
    mask[:3] = True
    heat = mask.astype(float)
    scores = metrics.score_map(heat, mask)
    assert scores["obj_iou"] == 1.0 and scores["func_iou"] == pytest.approx(0.5)


def test_f1_iou_in_the_method_table():
    from mmgradcam.eval.summary import markdown_tables, method_table

    def line(word_class, obj, func):
        scores = {key: 0.0 for key in metrics.metric_keys()} | {"obj_iou": obj, "func_iou": func}
        return {"kind": "word", "source": "generated", "class": word_class, "method": "m", "model": scores,
                "center": scores, "random": scores}

    table = method_table([line("noun", 0.6, 0.9), line("noun", 0.4, 0.9), line("function", 0.1, 0.2)], [])
    entry = table["f1_iou"]["m"]
    assert entry["obj_iou"] == pytest.approx(0.5) and entry["func_iou"] == pytest.approx(0.2)
    assert entry["f1_iou"] == pytest.approx(2 * 0.5 * 0.8 / 1.3)
    assert "center baseline" in table["f1_iou"]
    markdown = markdown_tables({"images": 1, "words_scored": 3, "answers_scored": 0, "skipped": [], "captions": {},
                                "per_category": {}, "methods": {"captions": ["m"]}, "method_table": table})
    assert "F1-IoU" in markdown and f"| m | 50.0 | 20.0 | {100 * 2 * 0.5 * 0.8 / 1.3:.1f} |" in markdown


# ----------------------------------------------------------------------------- perturbation test
class RegionVQA:
    """A toy VQA model: the answer "yes" has probability = the share of the top-left quadrant's
    pixels that are not grayed (the answer depends on that region only); maps are given."""

    family = "toy"
    default_method = "gradcam"

    def __init__(self, answer_map: np.ndarray):
        self.answer_map = answer_map

    def prepare(self, image, question):
        return {"pixels": np.asarray(image.convert("RGB"))}, None

    def answer_probabilities(self, inputs, answers):
        region = inputs["pixels"][:10, :10]
        return [float((region != 128).any(axis=-1).mean())]

    def explain(self, image, question, method=None, layer=None):
        maps = torch.from_numpy(self.answer_map)[None].float()
        return SimpleNamespace(answer="yes", method_maps={"gradcam": (maps, maps, None)})


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 120, (20, 20, 3)).astype("uint8"))


def test_perturbation_auc_is_low_when_the_map_marks_the_region():
    right = np.zeros((20, 20))
    right[:10, :10] = 1 + np.random.default_rng(2).random((10, 10))
    wrong = 1 + np.random.default_rng(3).random((20, 20))  # marks everything but the region
    wrong[:10, :10] = 0
    good = perturbation_study(RegionVQA(right), [(_image(), "q?")] * 2, method="gradcam")
    bad = perturbation_study(RegionVQA(wrong), [(_image(), "q?")] * 2, method="gradcam")
    g, b = good["methods"]["gradcam"], bad["methods"]["gradcam"]
    assert good["questions"] == 2 and good["steps"] == 10
    # the region is the first quarter of the pixels: gone after 25% (positive), kept until 75% (negative)
    assert g["positive_auc_map"] < 0.2 < 0.8 < g["negative_auc_map"]
    assert b["positive_auc_map"] > 0.8 and b["negative_auc_map"] < 0.2
    assert g["positive_auc_map"] < g["positive_auc_random"] < b["positive_auc_map"]


# ----------------------------------------------------------------------------- TAM
@pytest.fixture(scope="module")
def git():
    model, tokenizer, image_processor = tiny_git()
    return captioning.load(model, tokenizer=tokenizer, image_processor=image_processor)


def test_tam_raw_maps_equal_the_lm_head_at_the_image_tokens(git):
    caption = "a red circle to the left"
    inputs, _ = git.prepare(IMAGE, caption)
    tokens = git.tokenize(caption)
    with torch.no_grad():
        output = git.model(**inputs, output_hidden_states=True)
        logits, grid = git.image_token_logits(output, inputs)
        # brute force: the decoder's last hidden states at the image positions through the LM head
        hidden = output.hidden_states[-1]
        n_image = hidden.shape[1] - inputs["input_ids"].shape[1]
        patches = (inputs["pixel_values"].shape[-1] // git.model.config.vision_config.patch_size) ** 2
        brute = git.model.output(hidden[:, n_image - patches:n_image])
    assert grid == (4, 4) and logits.shape == (1, 16, git.model.config.vocab_size)
    torch.testing.assert_close(logits, brute, rtol=1e-5, atol=1e-5)
    # the maps TAM starts from: each word's token logit at every image token
    for positions in tokens.word_positions:
        (_, token), = positions
        assert brute[0, :, token].reshape(4, 4).shape == (4, 4)


def test_tam_maps_through_explain(git):
    caption = "a red circle to the left"
    result = git.explain(IMAGE, caption, method="tam,gradcam")
    assert result.method == "tam" and result.methods == ["tam", "gradcam"]
    assert result.layer_maps.shape == (6, 4, 4) and result.maps.shape == (6, 40, 48)
    assert result.method_maps["gradcam"][1].shape == (6, 4, 4)
    assert (result.layer_maps >= 0).all() and result.layer_maps.max() <= 1 + 1e-6
    # the same word log-probabilities as the gradient methods
    assert result.word_logprobs == pytest.approx(git.explain(IMAGE, caption, method="gradcam").word_logprobs)
    # the layer maps are the method applied to the brute-force raw maps
    inputs, _ = git.prepare(IMAGE, caption)
    with torch.no_grad():
        hidden = git.model(**inputs, output_hidden_states=True).hidden_states[-1]
        n_image = hidden.shape[1] - inputs["input_ids"].shape[1]
        image_logits = git.model.output(hidden[:, n_image - 16:n_image])[0]
    raw = torch.stack([image_logits[:, tok] for (_, tok), in git.tokenize(caption).word_positions]).reshape(6, 4, 4)
    torch.testing.assert_close(result.layer_maps, rank_gaussian(causal_correction(raw)), rtol=1e-4, atol=1e-5)


def test_causal_correction_removes_what_earlier_words_explain():
    torch.manual_seed(0)
    first = torch.rand(4, 4)
    spot = torch.zeros(4, 4)
    spot[1, 2] = 1.0
    raw = torch.stack([first, 2 * first + 3, 2 * first + 5 * spot])
    corrected = causal_correction(raw)
    assert torch.allclose(corrected[1], torch.zeros(4, 4), atol=1e-5)   # all explained by word 0 and an offset
    assert int(corrected[2].argmax()) == 1 * 4 + 2 and corrected[2].min() >= 0
    torch.testing.assert_close(corrected[0], (first - first.mean()).clamp(min=0))
    filtered = rank_gaussian(torch.stack([corrected[2], torch.zeros(4, 4)]))
    assert int(filtered[0].argmax()) == 1 * 4 + 2 and filtered[1].eq(0).all()


def test_tam_is_refused_where_image_tokens_are_not_in_the_text(tmp_path):
    from tiny import tiny_captioner, tiny_vqa

    default = captioning.load(str(tiny_captioner(tmp_path / "captioner")))
    with pytest.raises(ValueError, match=r"Families that support it: (\w+, )*git\b") as refused:
        default.explain(IMAGE, "a red circle", method="tam")
    assert "llava" in str(refused.value)  # every family whose image tokens sit in the text sequence
    answerer = vqa.load(str(tiny_vqa(tmp_path / "vqa", ["what", "color", "is", "the", "circle"], ["red", "blue"])))
    with pytest.raises(ValueError, match=r"support it: (\w+, )*git\b"):
        answerer.explain(IMAGE, "what color is the circle", method="tam")
    import mmgradcam as mg

    with pytest.raises(ValueError, match="task adapter"):
        mg.explain(default.model, torch.zeros(1, 3, 8, 8), [lambda o: o.sum()], "x", method="tam")


# ----------------------------------------------------------------------------- a tiny eval run
def test_a_tiny_eval_shows_the_paper_metrics(tmp_path):
    from mmgradcam.eval.pipeline import Evaluation
    from mmgradcam.report.build import build_report
    from tiny import tiny_eval_config

    config = tiny_eval_config(tmp_path, 2, perturbation_questions=2)
    out = tmp_path / "run"
    Evaluation(config, progress=False).run()
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(list(line["model"])[-2:] == ["obj_iou", "func_iou"] for line in lines if "model" in line)
    summary = json.loads((out / "summary.json").read_text())
    assert {"obj_iou", "func_iou"} <= set(summary["method_table"]["metrics"])
    study = summary["perturbation"]
    assert study["questions"] == 2 and set(study["methods"]) == {"gradcam", "hirescam"}
    for entry in study["methods"].values():
        assert {"positive_auc_map", "negative_auc_map", "positive_auc_random", "negative_auc_random"} <= set(entry)
    markdown = (out / "summary.md").read_text()
    assert "Perturbation test per method" in markdown and "| obj_iou | func_iou |" in markdown
    if summary["method_table"]["f1_iou"]:
        assert "F1-IoU" in markdown
    html = build_report(out).read_text()
    assert "Obj-IoU" in html
    # the perturbation table reaches the HTML page too, one row per method, numbers as in summary.json
    section = html[html.index("Perturbation test per method"):]
    section = section[:section.index("</table>")]
    assert section.count("<tr>") == 1 + len(study["methods"])
    hirescam = study["methods"]["hirescam"]
    assert f"<td>hirescam</td><td>{hirescam['positive_auc_map']:.2f} / {hirescam['positive_auc_random']:.2f}</td>" \
        in section


def test_tam_through_the_eval_cli_on_a_git_directory(tmp_path):
    """``mmgradcam eval --method tam,gradcam`` on a saved tiny GIT: both methods' lines are scored."""
    import subprocess
    import sys

    from mmgradcam.data.shapes import write_split

    for thing in tiny_git():
        thing.save_pretrained(tmp_path / "git")
    paths = write_split(tmp_path / "data", "test", 2, seed=1)
    result = subprocess.run([sys.executable, "-m", "mmgradcam.cli", "eval", "--instances", str(paths["instances"]),
                             "--captions", str(paths["captions"]), "--images", str(paths["images"]), "--references",
                             "--model", str(tmp_path / "git"), "--method", "tam,gradcam", "--quiet", "--out", "ev"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    words = [line for line in lines if line["kind"] == "word"]
    assert {line["method"] for line in words} == {"tam", "gradcam"}
    assert all("obj_iou" in line["model"] for line in words)
