"""Issue 13, methods own what they know: channel weights travel in Explanation (no Grad-CAM
alphas recomputed in tasks), Guided Grad-CAM is one registered method with one fusion rule that
captioning, VQA and eval share, and an eval run never skips a question because of the method."""
import json

import pytest
import torch
from PIL import Image
from torch import nn

import mmgradcam as mg
from mmgradcam.data.shapes import make_image, write_split
from mmgradcam.engine.registry import available_methods, get_method
from mmgradcam.eval.pipeline import EvalConfig, Evaluation
from mmgradcam.methods.guided_gradcam import GuidedGradCAM
from mmgradcam.targets import ClassScore
from mmgradcam.tasks import captioning, vqa
from test_eval_pipeline import ANSWERS, QUESTION_WORDS
from tiny import tiny_captioner, tiny_vqa


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ownership")
    return {"root": root, "paths": write_split(root / "data", "test", 4, seed=3),
            "captioner": tiny_captioner(root / "captioner", max_tokens=20, seed=2),
            "vqa": tiny_vqa(root / "vqa", QUESTION_WORDS, ANSWERS)}


@pytest.fixture(scope="module")
def image():
    pixels, _, _ = make_image(3, seed=5, size=64)
    return Image.fromarray(pixels)


def test_channel_weights_are_the_methods_own():
    model, x = ConvNet(), torch.rand(2, 3, 8, 8)
    targets = [ClassScore(0), ClassScore(2)]
    exps = mg.explain(model, x, targets, "features.2", "all")
    torch.testing.assert_close(exps["gradcam"].channel_weights, exps["gradcam"].gradients.mean(dim=(-2, -1)))
    for name, exp in exps.items():
        weights = get_method(name).weights(exp.activations, exp.gradients)
        if weights.shape[-2:] == (1, 1):
            torch.testing.assert_close(exp.channel_weights, weights[..., 0, 0])
        else:  # a method that weighs each location has no channel weights to report
            assert exp.channel_weights is None, name
    assert exps["hirescam"].channel_weights is None and exps["gradcam++"].channel_weights is not None


def test_guided_gradcam_has_one_rule_in_explain_and_in_the_function():
    model, x = ConvNet(), torch.rand(2, 3, 8, 8)
    targets = [ClassScore(1), ClassScore(3)]
    assert "guided-gradcam" in available_methods(pixel=True) and "guided-gradcam" not in available_methods()
    exp = mg.explain(model, x, targets, "features.2", "guided-gradcam")
    fused = mg.guided_gradcam(model, x, targets, "features.2")
    torch.testing.assert_close(exp.pixel_maps, GuidedGradCAM().pixel_map(fused))
    torch.testing.assert_close(exp.pixel_maps, fused.abs().amax(dim=2))
    gradcam = mg.explain(model, x, targets, "features.2")
    torch.testing.assert_close(exp.layer_maps, gradcam.layer_maps)  # the CAM map it refines
    assert exp.method == "guided-gradcam" and gradcam.pixel_maps is None


def test_tasks_report_the_asked_methods_weights_and_guided_maps(setup, image):
    cap = captioning.load(str(setup["captioner"]))
    caption = cap.generate(image)
    results = {m: cap.explain(image, caption, method=m) for m in ("gradcam", "gradcam++", "hirescam")}
    assert results["hirescam"].alphas is None
    assert not torch.allclose(results["gradcam"].alphas, results["gradcam++"].alphas)
    guided = cap.explain(image, caption, method="gradcam,guided-gradcam")
    assert guided.methods == ["gradcam", "guided-gradcam"]
    torch.testing.assert_close(guided.for_method("guided-gradcam").maps, guided.guided_maps)
    assert not torch.allclose(guided.guided_maps, guided.maps)  # real guided maps, not Grad-CAM's

    model = vqa.load(str(setup["vqa"]))
    question = "what color is the circle ?"
    plain = model.explain(image, question, method="gradcam")
    both = model.explain(image, question, method="guided-gradcam,hirescam", contrast="red")
    assert both.methods == ["guided-gradcam", "hirescam"] and both.method == "guided-gradcam"
    torch.testing.assert_close(both.maps, plain.maps)  # maps: the Grad-CAM maps it refines
    torch.testing.assert_close(both.alphas, plain.alphas)
    assert both.guided_maps.shape == plain.maps.shape and not torch.allclose(both.guided_maps, plain.maps)
    assert both.method_maps["guided-gradcam"][2] is not None  # its contrast map too
    assert model.explain(image, question, method="layercam").alphas is None


def test_eval_guided_gradcam_scores_guided_maps_for_captions_and_every_question(setup):
    p = setup["paths"]
    out = setup["root"] / "run"
    Evaluation(EvalConfig(instances=str(p["instances"]), images=str(p["images"]), out=str(out),
                          captions=str(p["captions"]), questions=str(p["questions"]), answers=str(p["answers"]),
                          model=str(setup["captioner"]), vqa_model=str(setup["vqa"]),
                          method="gradcam,guided-gradcam", batch_size=2), progress=False).run()
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert not [line for line in lines if line["kind"] == "skip" and "method" in line["reason"]]
    for kind in ("word", "answer"):
        by_method = {m: [line for line in lines if line["kind"] == kind and line["method"] == m]
                     for m in ("gradcam", "guided-gradcam")}
        assert by_method["guided-gradcam"], kind  # guided lines exist for captions AND questions
        assert len(by_method["guided-gradcam"]) == len(by_method["gradcam"]), kind  # no question skipped
        # the guided lines score other maps than Grad-CAM's (the baselines are the same)
        assert any(a["model"] != b["model"] for a, b in zip(by_method["gradcam"], by_method["guided-gradcam"])), kind
        assert all(a["center"] == b["center"] for a, b in zip(by_method["gradcam"], by_method["guided-gradcam"]))
