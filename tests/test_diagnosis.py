"""Diagnosis studies: Network Dissection with a planted concept channel, textual explanations,
targeted attacks within their budget, and the compare command."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image

from mmgradcam.data.shapes import COLORS, SHAPES, make_image, write_split
from mmgradcam.eval.adversarial import attack_caption_word, attack_vqa_answer, pgd
from mmgradcam.eval.coco import CocoData
from mmgradcam.eval.dissect import dissect, textual_explanation
from mmgradcam.tasks import captioning, vqa
from tiny import tiny_captioner, tiny_vqa


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    paths = write_split(root, "test", 24, seed=3)
    return root, paths


def test_planted_red_channel_is_named_red(shapes, tmp_path):
    root, paths = shapes
    captioner = captioning.load(str(tiny_captioner(tmp_path / "model", image_size=128)))
    conv = captioner.model.encoder.stem[0]
    with torch.no_grad():  # channel 0 of the stem = red minus green minus blue at the center tap
        conv.weight.zero_()
        conv.weight[0, :, 2, 2] = torch.tensor([1.0, -1.0, -1.0])
    data = CocoData.load(paths["instances"], paths["images"])
    result = dissect(captioner, data, sorted(data.images), layer="encoder.stem")
    channel = result["channels"][0]
    assert channel["concept"] == "red" and channel["iou"] > 0.15, channel
    assert result["layer"] == "encoder.stem" and set(COLORS) & set(result["concepts"])


def test_textual_explanation_sentence():
    dissection = {"channels": [{"channel": 0, "concept": "red", "iou": 0.41},
                               {"channel": 1, "concept": "circle", "iou": 0.33},
                               {"channel": 2, "concept": "blue", "iou": 0.38},
                               {"channel": 3, "concept": "star", "iou": 0.01}]}
    text = textual_explanation("red", np.array([0.9, 0.5, -0.7, 2.0]), dissection, top_k=2)
    assert text["sentence"] == ("'red' rests on channels that detect red (IoU 0.41), circle (IoU 0.33), "
                                "and against channels that detect blue (IoU 0.38).")
    assert [e["channel"] for e in text["for"]] == [0, 1]  # channel 3 is unnamed (IoU below the floor)


def test_pgd_flips_a_classifier_within_budget():
    from models import GapLinear

    class Keyword(GapLinear):
        def forward(self, pixel_values):
            return super().forward(pixel_values)

    # Class scores are the mean intensities of the three colour channels (1x1 identity conv, identity
    # head): red leads green by 0.1, and within a budget of 16/255 each mean can move 0.063, so a flip
    # to green exists and PGD must find it.
    model = Keyword(channels=3, classes=3)
    with torch.no_grad():
        model.conv = nn.Conv2d(3, 3, 1)
        model.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        model.conv.bias.zero_()
        model.fc.weight.copy_(torch.eye(3))
        model.fc.bias.zero_()
    torch.manual_seed(0)
    x = (torch.tensor([0.6, 0.5, 0.2]).view(1, 3, 1, 1) + 0.1 * torch.rand(1, 3, 16, 16)).clamp(0, 1)
    original, target = 0, 1
    assert int(model(x)[0].argmax()) == original
    objective = lambda out: out[0, target] - out[0, original]  # noqa: E731
    success = lambda out: int(out[0].argmax()) == target  # noqa: E731
    result = pgd(model, {"pixel_values": x}, objective, success, ([0.0] * 3, [1.0] * 3), eps=16 / 255, steps=200)
    assert result.flipped and int(model(result.adversarial)[0].argmax()) == target
    assert float((result.adversarial - x).abs().max()) <= 16 / 255 + 1e-6
    assert float(result.adversarial.min()) >= 0 and float(result.adversarial.max()) <= 1  # still an image
    assert all(p.grad is None for p in model.parameters())


def test_shipped_captioner_attack_flips_a_word_within_8_grey_levels():
    captioner = captioning.load("default")
    pixels, objects, _ = make_image(4, seed=77)
    image = Image.fromarray(pixels)
    caption = captioner.generate(image)
    shape = next(o.shape for o in objects if o.shape in caption.split())
    rival = next(s for s in SHAPES if s != shape)
    result = attack_caption_word(captioner, image, caption, shape, rival, eps=8 / 255, steps=40)
    assert result["flipped"], result
    assert result["linf_pixels"] <= 8 / 255 + 1e-6
    assert result["word_logprob_after"] < result["word_logprob_before"]


def test_vqa_attack_respects_the_budget_and_scores_against_a_mask(tmp_path):
    words = ["what", "color", "is", "the", "?"] + list(COLORS) + list(SHAPES)
    model = vqa.load(str(tiny_vqa(tmp_path / "vqa", words, sorted(COLORS) + ["yes", "no"])))
    image = Image.fromarray(make_image(2, seed=5, size=64)[0])
    question = "what color is the circle ?"
    answer = model.answer(image, question, top_k=1)[0][0]
    target = next(a for a in model.answers if a != answer)
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:30, 10:30] = True
    result = attack_vqa_answer(model, image, question, answer, target, eps=4 / 255, steps=10, mask=mask)
    assert result["linf_pixels"] <= 4 / 255 + 1e-6 and result["steps"] <= 10
    assert result["objective_after"] > result["objective_before"]
    assert set(result["maps"]["original"]) >= {"energy", "pointing_15px"}
    assert all(p.grad is None for p in model.model.parameters())


def test_shipped_vqa_attack_flips_an_answer_within_8_grey_levels():
    model = vqa.load("default")
    pixels, objects, _ = make_image(4, seed=77)
    image = Image.fromarray(pixels)
    question = f"is there a {objects[0].color} {objects[0].shape} ?"
    answer = model.answer(image, question, top_k=1)[0][0]
    target = "no" if answer == "yes" else "yes"
    result = attack_vqa_answer(model, image, question, answer, target, eps=8 / 255, steps=40)
    assert result["flipped"] and result["top_answer_after"] == target
    assert result["linf_pixels"] <= 8 / 255 + 1e-6


def test_adversarial_and_compare_commands(tmp_path):
    tiny_captioner(tmp_path / "a", seed=0)
    tiny_captioner(tmp_path / "b", seed=1)
    Image.fromarray(make_image(2, seed=5, size=64)[0]).save(tmp_path / "img.png")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mmgradcam.cli", *a], cwd=tmp_path,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    result = run("adversarial", "img.png", "--model", str(tmp_path / "a"), "--caption", "a red circle", "--word",
                 "red", "--to", "blue", "--steps", "5", "--out", "adv")
    assert result.returncode == 0, result.stderr
    attack = json.loads((tmp_path / "adv" / "result.json").read_text())
    assert attack["steps"] <= 5 and attack["linf_pixels"] <= 8 / 255 + 1e-6
    assert (tmp_path / "adv" / "adversarial.png").is_file()
    result = run("compare", str(tmp_path / "a"), str(tmp_path / "b"), "img.png", "--caption", "a red circle",
                 "--word", "circle", "--out", "cmp")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "cmp" / "result.json").read_text())
    assert [w["word"] for w in summary["words"]] == ["circle"]
    assert summary["words"][0]["A"]["logprob"] != summary["words"][0]["B"]["logprob"]
