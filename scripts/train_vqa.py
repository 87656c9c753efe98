"""Train the default VQA model on the shapes world (CPU, about 15 minutes on 2 cores).

    python scripts/train_vqa.py --data data/shapes --out runs/vqa --ship
    python scripts/train_vqa.py --data data/shapes --out runs/vqa-blind --blank-images --steps 300

--blank-images trains and evaluates the same model with every image blanked: the question-only
baseline. Resumable like train_captioner.py; --ship copies the model into tasks/weights/vqa.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from mmgradcam.data.shapes import read_split
from mmgradcam.tasks import checkpoints
from mmgradcam.tasks.default import build_vqa_model
from mmgradcam.tasks.text import Vocabulary, split_words

from _training import common_arguments, finish, load_images, prepare_splits, train_loop

IMAGE_SIZE = 128


def question_table(split: dict, ids: list[int], vocab: Vocabulary, answers: dict[str, int]) -> dict:
    """Questions as padded id rows, with answer index, image row and question type."""
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    by_id = {a["question_id"]: a for a in split["answers"]["annotations"]}
    rows = []
    for q in split["questions"]["questions"]:
        annotation = by_id[q["question_id"]]
        rows.append((vocab.encode(split_words(q["question"]), unknown="ignore"), answers.get(
            annotation["multiple_choice_answer"], -100), row_of[q["image_id"]], annotation["question_type"]))
    length = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), length), vocab.pad_id, dtype=torch.long)
    for i, (tokens, *_) in enumerate(rows):
        input_ids[i, :len(tokens)] = torch.tensor(tokens)
    return {"input_ids": input_ids, "attention_mask": (input_ids != vocab.pad_id).long(),
            "answer": torch.tensor([r[1] for r in rows]), "image": torch.tensor([r[2] for r in rows]),
            "type": [r[3] for r in rows]}


def evaluate(model, pixels: torch.Tensor, table: dict, blank: bool) -> dict:
    correct, count = defaultdict(int), defaultdict(int)
    with torch.no_grad():
        for start in range(0, len(table["answer"]), 256):
            rows = slice(start, start + 256)
            images = pixels[table["image"][rows]]
            if blank:
                images = torch.zeros_like(images)
            predicted = model(images, table["input_ids"][rows], table["attention_mask"][rows]).argmax(-1)
            for kind, ok in zip(table["type"][rows], (predicted == table["answer"][rows]).tolist()):
                correct[kind] += ok
                count[kind] += 1
    result = {kind: correct[kind] / count[kind] for kind in sorted(count)}
    result["all"] = sum(correct.values()) / sum(count.values())
    result["questions"] = sum(count.values())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "runs/vqa", steps=1500)
    parser.add_argument("--blank-images", action="store_true", help="question-only baseline")
    parser.add_argument("--init-encoder", type=Path, default=None,
                        help="start the image encoder from a trained default captioner (a model directory)")
    parser.add_argument("--fusion", choices=["attention", "film"], default="film",
                        help="film: question-conditioned residual convolutions over the grid (default); "
                             "attention: question tokens attending over the regions (the first shipped model)")
    parser.add_argument("--readout", choices=["pool", "attention"], default="pool",
                        help="FiLM only: read the answer from max+mean pooled regions (pool) or from a question "
                             "query attending over the regions beside the mean (attention)")
    parser.add_argument("--dilations", default="1,2,4,8", help="FiLM blocks' dilations (one block each)")
    parser.add_argument("--freeze-encoder", action="store_true",
                        help="keep that encoder fixed: its features are computed once and only the question "
                             "fusion and classifier train (many cheap steps instead of few costly ones)")
    args = parser.parse_args(argv)

    splits = prepare_splits(args)
    train = read_split(args.data, "train")
    vocab = Vocabulary.build(q["question"] for q in train["questions"]["questions"])
    answer_list = sorted({a["multiple_choice_answer"] for a in train["answers"]["annotations"]})
    answers = {a: i for i, a in enumerate(answer_list)}
    max_question = 16
    encoder = args.encoder
    if args.init_encoder:  # the trunk must be built as the captioner's was
        encoder = checkpoints.read_config(args.init_encoder).get("encoder")
    config = {"task": "vqa", "family": "default", "image_size": IMAGE_SIZE, "grid": IMAGE_SIZE // 8,
              "dim": args.dim, "layers": args.layers, "heads": args.heads, "max_question": max_question,
              "fusion": args.fusion, "readout": args.readout, "dilations": [int(d) for d in args.dilations.split(",")], "encoder": encoder,
              "vocabulary": vocab.words, "answers": answer_list, "blank_images": args.blank_images,
              "trained_with": " ".join(sys.argv if argv is None else argv), "seed": args.seed}
    model = build_vqa_model(config)
    if args.init_encoder:
        from safetensors.torch import load_file

        state = load_file(str(args.init_encoder / checkpoints.WEIGHTS))
        encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        model.encoder.load_state_dict(encoder)
        config["encoder_from"] = str(args.init_encoder)
    pixels, ids = load_images(train)
    if args.blank_images:
        pixels = torch.zeros_like(pixels[:1]).expand_as(pixels)
    table = question_table(train, ids, vocab, answers)

    features = None
    if args.freeze_encoder:
        if not args.init_encoder:
            parser.error("--freeze-encoder needs --init-encoder")
        model.encoder.requires_grad_(False).eval()
        with torch.no_grad():
            features = torch.cat([model.encoder(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])

    def loss_fn(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = table["image"][batch]
        if features is not None:
            logits = model.answer_features(features[images], table["input_ids"][batch], table["attention_mask"][batch])
        else:
            logits = model(pixels[images], table["input_ids"][batch], table["attention_mask"][batch])
        return F.cross_entropy(logits, table["answer"][batch])

    train_loop(model, loss_fn, len(table["answer"]), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
               out=args.out, seed=args.seed, checkpoint_every=args.checkpoint_every, bf16=args.bf16)
    report = {}
    for split_name in splits:
        split = read_split(args.data, split_name)
        split_pixels, split_ids = load_images(split)
        report[split_name] = evaluate(model, split_pixels, question_table(split, split_ids, vocab, answers),
                                      args.blank_images)
    finish(model, config, report, args, "vqa")
    return 0


if __name__ == "__main__":
    sys.exit(main())
