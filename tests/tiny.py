"""Tiny random-weight default-family models saved as model directories, for fast tests."""
from __future__ import annotations

from pathlib import Path

import torch

from mmgradcam.data.shapes import COLORS, NUMBER_WORDS, PLURALS, SHAPES
from mmgradcam.tasks import checkpoints
from mmgradcam.tasks.default import build_caption_model, build_vqa_model
from mmgradcam.tasks.text import Vocabulary

SHAPES_WORDS = (["a", "there", "is", "are", "and", ",", "small", "large", "to", "the", "left", "right", "of",
                 "above", "below", "in", "top", "bottom", "center"] + list(COLORS) + list(SHAPES)
                + list(PLURALS.values()) + list(NUMBER_WORDS.values()))


def tiny_captioner(directory: Path, words=SHAPES_WORDS, image_size: int = 64, max_tokens: int = 24, seed: int = 0,
                   favor: tuple[str, ...] = tuple(COLORS) + tuple(SHAPES)) -> Path:
    """A random-weight captioner; the output bias favours the ``favor`` words so that its own
    captions contain scorable words (a purely random one tends to loop on function words)."""
    torch.manual_seed(seed)
    config = {"task": "captioning", "family": "default", "image_size": image_size, "grid": image_size // 8,
              "dim": 32, "layers": 1, "heads": 2, "max_tokens": max_tokens, "vocabulary": Vocabulary(words).words}
    model = build_caption_model(config)
    with torch.no_grad():
        for index, word in enumerate(config["vocabulary"]):
            if word in favor:
                model.head.bias[index] += 3.0
    checkpoints.save_model(model, config, directory)
    return directory


def tiny_vqa(directory: Path, words, answers, image_size: int = 64, max_question: int = 16, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    config = {"task": "vqa", "family": "default", "image_size": image_size, "grid": image_size // 8, "dim": 32,
              "layers": 1, "heads": 2, "max_question": max_question, "vocabulary": Vocabulary(words).words,
              "answers": list(answers)}
    checkpoints.save_model(build_vqa_model(config), config, directory)
    return directory


def tiny_eval_config(root: Path, images: int, **options):
    """A tiny shapes-world test split, a tiny captioner and VQA model, and an EvalConfig over them
    (captions and VQA, Grad-CAM and HiResCAM, batch 2); ``options`` add or override config fields."""
    from mmgradcam.data.shapes import write_split
    from mmgradcam.eval.pipeline import EvalConfig
    from test_eval_pipeline import ANSWERS, QUESTION_WORDS

    paths = write_split(root / "data", "test", images, seed=5)
    captioner = tiny_captioner(root / "captioner", favor=tuple(COLORS) + tuple(SHAPES) + ("a", "the"), seed=2)
    answerer = tiny_vqa(root / "vqa", QUESTION_WORDS, ANSWERS)
    fields = dict(instances=str(paths["instances"]), images=str(paths["images"]), out=str(root / "run"),
                  captions=str(paths["captions"]), questions=str(paths["questions"]), answers=str(paths["answers"]),
                  model=str(captioner), vqa_model=str(answerer), method="gradcam,hirescam", batch_size=2)
    return EvalConfig(**(fields | options))
