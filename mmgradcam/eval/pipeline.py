"""``mmgradcam eval``: explain a model over a COCO-format data set and score every mappable word.

Work is cut into fixed batches of images (batch k = images k*B .. k*B+B-1 in id order). Each
batch's result lines are appended to this process's shard file followed by a ``batch_done``
marker, then flushed and fsynced; a rerun with the same arguments drops any incomplete tail,
skips finished batches and, batches being fixed, ends with exactly the results of an
uninterrupted run. Under torchrun, rank r takes batches k with k % world == r and rank 0 merges
the shards into results.jsonl, summary.json, summary.md and the plots.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .coco import CocoData, Skip, read_json
from .metrics import METRICS, center_gaussian, score_maps, uniform_random
from .words import WordMapper, load_synonyms

RESULTS = "results.jsonl"
SHARDS = "shards"


@dataclass
class EvalConfig:
    instances: str
    images: str
    out: str
    captions: str | None = None
    questions: str | None = None
    answers: str | None = None
    model: str = "default"
    vqa_model: str = "default"
    method: str = "gradcam"
    layer: str | None = None
    limit: int | None = None
    batch_size: int = 16
    references: bool = False
    synonyms: str | None = None
    sanity_images: int = 0
    faithfulness_images: int = 0
    seed: int = 0
    skip_captions: bool = False
    extra: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """What must match for a rerun to resume (not batch-independent knobs like progress)."""
        keep = asdict(self)
        keep.pop("sanity_images")
        keep.pop("faithfulness_images")
        return keep


# ----------------------------------------------------------------------------- shard files
def _shard_path(out: Path, rank: int) -> Path:
    return out / SHARDS / f"rank{rank:03d}.jsonl"


def read_complete_batches(path: Path, truncate: bool = False) -> dict[int, list[dict]]:
    """Lines of every batch that reached its ``batch_done`` marker; optionally cut the rest off."""
    done: dict[int, list[dict]] = {}
    if not path.is_file():
        return done
    pending: list[dict] = []
    good_bytes = 0
    offset = 0
    with path.open("rb") as handle:
        for raw in handle:
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # a line cut off by a kill
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                break
            if line.get("kind") == "batch_done":
                done[int(line["batch"])] = pending
                pending = []
                good_bytes = offset
            else:
                pending.append(line)
    if truncate and good_bytes < path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return done


def all_complete_batches(out: Path) -> dict[int, list[dict]]:
    merged: dict[int, list[dict]] = {}
    for shard in sorted((out / SHARDS).glob("rank*.jsonl")):
        for batch, lines in read_complete_batches(shard).items():
            merged.setdefault(batch, lines)
    return merged


def _append(path: Path, lines: list[dict], batch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    text += json.dumps({"kind": "batch_done", "batch": batch}) + "\n"
    with path.open("a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- scoring
def _scores_with_baselines(heatmap: np.ndarray, mask: np.ndarray, seed: int) -> dict:
    return score_maps({"model": heatmap, "center": center_gaussian(mask.shape),
                       "random": uniform_random(mask.shape, seed)}, mask)


def _word_seed(seed: int, image_id: int, source: str, index: int) -> int:
    return (seed * 1_000_003 + int(image_id) * 101 + index * 7 + (0 if source == "generated" else 3)) % (2**32)


class Evaluation:
    """One evaluation run (one process of it under torchrun)."""

    def __init__(self, config: EvalConfig, rank: int = 0, world: int = 1, progress: bool = True):
        self.config = config
        self.rank, self.world = rank, world
        self.progress = progress and rank == 0
        self.out = Path(config.out)
        self.data = CocoData.load(config.instances, config.images, config.captions)
        synonyms = load_synonyms(config.synonyms)
        self.mapper = WordMapper(self.data.categories.values(), self.data.colors, synonyms)
        ids = sorted(self.data.images)
        self.image_ids = ids[:config.limit] if config.limit else ids
        self.questions = self._load_questions() if config.questions else {}
        self._captioner = None
        self._vqa = None
        self._batch_maps: dict[str, np.ndarray] = {}

    # models are loaded lazily so a finished run can be re-summarized without them
    @property
    def captioner(self):
        if self._captioner is None:
            from mmgradcam.tasks import captioning

            self._captioner = captioning.load(self.config.model)
        return self._captioner

    @property
    def vqa(self):
        if self._vqa is None:
            from mmgradcam.tasks import vqa

            self._vqa = vqa.load(self.config.vqa_model)
        return self._vqa

    def _load_questions(self) -> dict[int, list[dict]]:
        if not self.config.answers:
            raise ValueError("--questions needs --answers (the VQA annotations with object ids)")
        questions = read_json(self.config.questions, "--questions")
        answers = read_json(self.config.answers, "--answers")
        if "questions" not in questions or "annotations" not in answers:
            raise ValueError("--questions needs a 'questions' list and --answers an 'annotations' list (VQA v2)")
        by_id = {a.get("question_id"): a for a in answers["annotations"]}
        table: dict[int, list[dict]] = {}
        for q in questions["questions"]:
            annotation = by_id.get(q.get("question_id"))
            if annotation is None or q.get("image_id") not in self.data.images:
                self.data.skipped.append(Skip("question", q.get("question_id"), "no annotation or unknown image"))
                continue
            table.setdefault(q["image_id"], []).append({**q, **annotation})
        return table

    @property
    def batches(self) -> list[list[int]]:
        size = self.config.batch_size
        return [self.image_ids[k:k + size] for k in range(0, len(self.image_ids), size)]

    def _check_run_file(self) -> None:
        run_file = self.out / "run.json"
        identity = self.config.identity()
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            if previous != identity:
                changed = sorted(k for k in identity if previous.get(k) != identity[k])
                raise ValueError(f"--out {str(self.out)!r} holds a run with other arguments ({', '.join(changed)}); "
                                 "use a new --out or the same arguments to resume")
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = run_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(identity, indent=1))
            tmp.replace(run_file)

    def run(self) -> dict | None:
        """Process this rank's unfinished batches; rank 0 then merges and summarizes."""
        from . import distributed

        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self._check_run_file()
        distributed.barrier(self.world)
        if self.rank != 0:
            self._check_run_file()
        shard = _shard_path(self.out, self.rank)
        read_complete_batches(shard, truncate=True)
        finished = set(all_complete_batches(self.out))
        todo = [k for k in range(len(self.batches)) if k % self.world == self.rank and k not in finished]
        images_done = 0
        start = time.time()
        bar = None
        if self.progress:
            from tqdm import tqdm

            total = sum(len(self.batches[k]) for k in range(len(self.batches)) if k % self.world == self.rank)
            bar = tqdm(total=total, initial=total - sum(len(self.batches[k]) for k in todo), unit="img",
                       desc=f"eval ({self.world} process{'es' if self.world > 1 else ''})")
        for k in todo:
            lines = self.process_batch(k)
            _append(shard, lines, k)
            images_done += len(self.batches[k])
            if bar is not None:
                bar.update(len(self.batches[k]))
                bar.set_postfix(img_s=f"{images_done / max(time.time() - start, 1e-9):.1f}")
        if bar is not None:
            bar.close()
        distributed.barrier(self.world)
        if self.rank != 0:
            return None
        return self.finish()

    # ------------------------------------------------------------------------- one batch
    def _load_images(self, batch: list[int]) -> tuple[list[tuple[int, object]], list[Skip]]:
        from mmgradcam.tasks.geometry import load_image

        loaded, skipped = [], []
        for image_id in batch:
            path = self.data.images[image_id]["path"]
            try:
                loaded.append((image_id, load_image(path, what=f"image {image_id}")))
            except (FileNotFoundError, ValueError, OSError) as error:
                skipped.append(Skip("image", image_id, str(error)))
        return loaded, skipped

    def process_batch(self, k: int) -> list[dict]:
        batch = self.batches[k]
        loaded, bad_images = self._load_images(batch)
        lines = [s.as_line(k) for s in bad_images]
        if not loaded:
            return lines
        masks = {}
        for image_id, pil in loaded:
            by_category, by_color, bad = self.data.target_masks(image_id, pil.height, pil.width)
            masks[image_id] = (by_category, by_color)
            lines += [s.as_line(k) for s in bad]
        if not self.config.skip_captions:
            jobs = [(image_id, pil, None, "generated") for image_id, pil in loaded]
            if self.config.references:
                jobs += [(image_id, pil, self.data.captions[image_id][0], "reference")
                         for image_id, pil in loaded if self.data.captions.get(image_id)]
            # only words that can be scored are explained: fewer targets, a cheaper batched backward
            results = self.captioner.explain_batch([j[1] for j in jobs], [j[2] for j in jobs],
                                                   method=self.config.method, layer=self.config.layer,
                                                   select=lambda words: [m.index for m in self.mapper.map(words)])
            for (image_id, pil, _, source), result in zip(jobs, results):
                lines += self._score_caption(k, image_id, source, result, masks[image_id])
        for image_id, pil in loaded:
            for question in self.questions.get(image_id, []):
                lines += self._score_question(k, image_id, pil, question)
        self._save_maps(k)
        return lines

    def _keep_map(self, key: str, heatmap: np.ndarray) -> None:
        """Keep a small copy (longest side 64 px, float16) of a scored map for reports."""
        import torch
        import torch.nn.functional as F

        h, w = heatmap.shape
        factor = min(1.0, 64 / max(h, w))
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        small = F.interpolate(torch.from_numpy(np.asarray(heatmap, dtype=np.float32))[None, None], size=size,
                              mode="area")[0, 0].numpy()
        self._batch_maps[key] = small.astype(np.float16)

    def _save_maps(self, k: int) -> None:
        """Write the batch's small maps (before its lines, so a resumed batch rewrites the same file)."""
        if not self._batch_maps:
            return
        directory = self.out / "maps"
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"batch{k:06d}.tmp.npz"
        np.savez_compressed(tmp, **self._batch_maps)
        tmp.replace(directory / f"batch{k:06d}.npz")
        self._batch_maps = {}

    def _score_caption(self, k: int, image_id: int, source: str, result, masks) -> list[dict]:
        by_category, by_color = masks
        lines = []
        for mapped in self.mapper.map(result.words):
            mask = (by_category if mapped.word_class == "noun" else by_color).get(mapped.target)
            if mask is None:
                continue  # no instance of the word's category (or color) in this image: not scored
            heatmap = result.maps[mapped.index].numpy()
            scores = _scores_with_baselines(heatmap, mask, _word_seed(self.config.seed, image_id, source, mapped.index))
            self._keep_map(f"{image_id}/{source}/{mapped.index}", heatmap)
            lines.append({"kind": "word", "batch": k, "image_id": image_id, "source": source,
                          "caption": result.caption, "word_index": mapped.index, "word": mapped.word,
                          "class": mapped.word_class, "target": mapped.target,
                          "logprob": result.word_logprobs[mapped.index], **scores})
        return lines

    def _score_question(self, k: int, image_id: int, pil, question: dict) -> list[dict]:
        object_ids = question.get("object_ids") or []
        if not object_ids:
            return []
        mask = self.data.object_mask(object_ids, image_id, pil.height, pil.width)
        if mask is None:
            return [Skip("question", question.get("question_id"), "its objects have no usable mask").as_line(k)]
        try:
            result = self.vqa.explain(pil, question["question"], method=self.config.method, layer=self.config.layer)
        except ValueError as error:
            return [Skip("question", question.get("question_id"), str(error)).as_line(k)]
        truth = question.get("multiple_choice_answer")
        scores = _scores_with_baselines(result.map.numpy(), mask,
                                        _word_seed(self.config.seed, image_id, "vqa", int(question["question_id"])))
        self._keep_map(f"{image_id}/vqa/{question['question_id']}", result.map.numpy())
        return [{"kind": "answer", "batch": k, "image_id": image_id, "question_id": question["question_id"],
                 "question": question["question"], "question_type": question.get("question_type", ""),
                 "answer": result.answer, "truth": truth, "correct": result.answer == truth, **scores}]

    # ------------------------------------------------------------------------- merge and summary
    def merged_lines(self) -> Iterator[dict]:
        complete = all_complete_batches(self.out)
        for k in sorted(complete):
            yield from complete[k]

    def finish(self) -> dict:
        from .summary import summarize, write_reports

        lines = list(self.merged_lines())
        results = self.out / RESULTS
        tmp = results.with_suffix(".tmp")
        with tmp.open("w") as handle:
            for line in lines:
                if line["kind"] in ("word", "answer"):
                    handle.write(json.dumps(line) + "\n")
        tmp.replace(results)
        missing = len(self.batches) - len(all_complete_batches(self.out))
        summary = summarize(lines, self.data.skipped, images=len(self.image_ids), incomplete_batches=missing,
                            config=self.config)
        if self.config.sanity_images or self.config.faithfulness_images:
            from .faithfulness import faithfulness_study, randomization_study

            ids = self.image_ids[:max(self.config.sanity_images, self.config.faithfulness_images)]
            images, _ = self._load_images(ids)
            if self.config.sanity_images:
                summary["sanity"] = randomization_study(self.captioner, [p for _, p in images[:self.config.sanity_images]],
                                                        method=self.config.method, layer=self.config.layer)
            if self.config.faithfulness_images:
                summary["faithfulness"] = faithfulness_study(
                    self.captioner, [p for _, p in images[:self.config.faithfulness_images]],
                    method=self.config.method, layer=self.config.layer, seed=self.config.seed)
        write_reports(self.out, summary, lines)
        return summary


def run_eval(config: EvalConfig, progress: bool = True) -> dict | None:
    from . import distributed

    rank, world = distributed.setup()
    try:
        return Evaluation(config, rank, world, progress).run()
    finally:
        distributed.teardown(world)


__all__ = ["EvalConfig", "Evaluation", "run_eval", "read_complete_batches", "METRICS"]
