"""Train the default captioner on the shapes world (CPU, about 18 minutes on 2 cores).

    python scripts/train_captioner.py --data data/shapes --out runs/captioner --ship

The data set is written first if missing (seeded). Checkpoints (torch.save of tensors only, read
back with weights_only=True) are kept in --out every --checkpoint-every steps, so a killed run
resumes where it stopped with the same command. The final model is written as safetensors +
config.json; --ship copies it into the package (tasks/weights/captioner).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmgradcam.data.shapes import image_objects, read_split
from mmgradcam.eval.caption_quality import bleu4, names_every_object, names_every_shape
from mmgradcam.tasks import checkpoints
from mmgradcam.tasks.default import DefaultCaptioner, build_caption_model
from mmgradcam.tasks.text import Vocabulary, split_words

from _training import common_arguments, finish, load_images, prepare_splits, train_loop

IMAGE_SIZE = 128


def encode_captions(split: dict, ids: list[int], vocab: Vocabulary, max_tokens: int) -> list[list[torch.Tensor]]:
    by_image: dict[int, list[torch.Tensor]] = {i: [] for i in ids}
    for ann in split["captions"]["annotations"]:
        words = split_words(ann["caption"])
        tokens = [vocab.bos_id] + vocab.encode(words) + [vocab.eos_id]
        if len(tokens) <= max_tokens + 1:
            by_image[ann["image_id"]].append(torch.tensor(tokens))
    return [by_image[i] for i in ids]


def batch_tokens(captions: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    length = max(len(c) for c in captions)
    out = torch.full((len(captions), length), pad_id, dtype=torch.long)
    for row, caption in enumerate(captions):
        out[row, :len(caption)] = caption
    return out


def evaluate(captioner: DefaultCaptioner, split: dict, pixels: torch.Tensor, ids: list[int],
             limit: int | None = None) -> dict:
    """BLEU-4 and how often the greedy caption names every object's color and shape."""
    limit = limit or len(ids)
    generated = []
    for start in range(0, limit, 128):
        generated += captioner.generate_from_pixels(pixels[start:min(start + 128, limit)])
    refs: dict[int, list[str]] = {}
    for ann in split["captions"]["annotations"]:
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    objects = image_objects(split["instances"])
    ids = ids[:limit]
    return {
        "images": limit,
        "bleu4": bleu4([refs[i] for i in ids], generated),
        "names_every_object": float(np.mean([names_every_object(g, objects[i]) for g, i in zip(generated, ids)])),
        "names_every_shape": float(np.mean([names_every_shape(g, objects[i]) for g, i in zip(generated, ids)])),
        "examples": [{"image_id": i, "caption": g} for g, i in list(zip(generated, ids))[:5]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "runs/captioner", steps=1600)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many images")
    parser.add_argument("--bias", default=None, help='confounded training split, e.g. "circle=red"')
    parser.add_argument("--init", type=Path, default=None, help="start from this model directory's weights")
    args = parser.parse_args(argv)

    bias = dict(item.split("=") for item in args.bias.split(",")) if args.bias else None
    splits = prepare_splits(args, bias)
    train = read_split(args.data, "train")
    vocab = Vocabulary.build(a["caption"] for a in train["captions"]["annotations"])
    config = {"task": "captioning", "family": "default", "image_size": IMAGE_SIZE, "grid": IMAGE_SIZE // 8,
              "dim": args.dim, "layers": args.layers, "heads": args.heads, "max_tokens": args.max_tokens,
              "vocabulary": vocab.words, "encoder": args.encoder,
              "trained_with": " ".join(sys.argv if argv is None else argv),
              "seed": args.seed}
    model = build_caption_model(config)
    if args.init:
        checkpoints.load_weights(model, args.init)
    pixels, ids = load_images(train)
    captions = encode_captions(train, ids, vocab, args.max_tokens)

    def loss_fn(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        choice = torch.randint(0, 1 << 30, (len(batch),), generator=generator)  # one caption per image
        tokens = batch_tokens([captions[i][int(c) % len(captions[i])] for i, c in zip(batch.tolist(), choice)],
                              vocab.pad_id)
        logits = model(pixels[batch], tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                               ignore_index=vocab.pad_id)

    train_loop(model, loss_fn, len(ids), steps=args.steps, batch_size=args.batch_size, lr=args.lr, out=args.out,
               seed=args.seed, checkpoint_every=args.checkpoint_every, bf16=args.bf16)
    captioner = DefaultCaptioner(model, config)
    report = {}
    for name in splits:
        split = read_split(args.data, name)
        split_pixels, split_ids = load_images(split)
        report[name] = evaluate(captioner, split, split_pixels, split_ids, args.eval_limit)
    finish(model, config, report, args, "captioner")
    return 0


if __name__ == "__main__":
    sys.exit(main())
