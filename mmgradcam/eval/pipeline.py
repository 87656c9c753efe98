"""``mmgradcam eval``: explain a model over a COCO-format data set and score every mappable word.

Work is cut into fixed batches of images (batch k = images k*B .. k*B+B-1 in id order). Each
batch's result lines are appended to this process's shard file followed by a ``batch_done``
marker, then flushed and fsynced; a rerun with the same arguments drops any incomplete tail,
skips finished batches and, batches being fixed, ends with exactly the results of an
uninterrupted run. Under torchrun, rank r takes batches k with k % world == r and rank 0 merges
the shards into results.jsonl, summary.json and summary.md.

Several methods (``method="gradcam,hirescam"`` or ``"all"``) come from the same pass: each
batch's captions are explained by ONE ``explain_batch`` call and each question by ONE
``vqa.explain`` call for all methods; every method's map is scored, and the baselines (center
Gaussian, uniform random), which do not depend on the method, once per word. results.jsonl has
one line per scored word (or answer) per method, with a "method" field; the baselines are the
same on every method's line of a word.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from mmgradcam.methods.base import method_names

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
    method: str | None = None  # None: each model's default method; "a,b" / "all": several from one pass
    layer: str | None = None
    limit: int | None = None
    batch_size: int = 16
    references: bool = False
    synonyms: str | None = None
    sanity_images: int = 0
    faithfulness_images: int = 0
    seed: int = 0
    skip_captions: bool = False
    function_words: bool = True  # also score every other caption word against all objects' union
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
def _scores_with_baselines(heatmaps: dict[str, np.ndarray], mask: np.ndarray, seed: int,
                           distance: np.ndarray | None = None) -> tuple[dict[str, dict], dict, dict]:
    """Every method's scores, and the center and random baselines' (once: they do not depend on
    the method), against one mask."""
    scores = score_maps({"center": center_gaussian(mask.shape), "random": uniform_random(mask.shape, seed),
                         **{("method", name): heatmap for name, heatmap in heatmaps.items()}}, mask, distance)
    return {name: scores[("method", name)] for name in heatmaps}, scores["center"], scores["random"]


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
        if config.method is not None:
            method_names(config.method)  # an unknown name fails now, before any work
        self._captioner = None
        self._vqa = None
        self._methods: dict[str, list[str]] = {}
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

    def methods(self, task: str) -> list[str]:
        """The methods explained for ``task`` ("captions" or "vqa"): ``config.method``, or the
        model's own default method when it is None (loading the model)."""
        if task not in self._methods:
            spec = self.config.method
            if spec is None:
                spec = (self.captioner if task == "captions" else self.vqa).default_method
            self._methods[task] = method_names(spec)
        return self._methods[task]

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
            # a function word's mask: every object in the image (None when it has none)
            objects = np.any(list(by_category.values()), axis=0) if by_category else None
            masks[image_id] = (by_category, by_color, objects)
            lines += [s.as_line(k) for s in bad]
        if not self.config.skip_captions:
            jobs = [(image_id, pil, None, "generated") for image_id, pil in loaded]
            if self.config.references:
                jobs += [(image_id, pil, self.data.captions[image_id][0], "reference")
                         for image_id, pil in loaded if self.data.captions.get(image_id)]
            # only words that can be scored are explained (fewer targets, a cheaper batched
            # backward), and every method from this one call
            function_words = self.config.function_words
            results = self.captioner.explain_batch(
                [j[1] for j in jobs], [j[2] for j in jobs], method=self.methods("captions"), layer=self.config.layer,
                select=lambda words: [m.index for m in self.mapper.classify(words, function_words)])
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
        by_category, by_color, objects = masks
        methods = self.methods("captions")
        lines = []
        distances: dict[tuple[str, str], np.ndarray] = {}  # one distance transform per mask
        for mapped in self.mapper.classify(result.words, self.config.function_words):
            if mapped.word_class == "function":
                mask = objects
            else:
                mask = (by_category if mapped.word_class == "noun" else by_color).get(mapped.target)
            if mask is None:
                continue  # no instance of the word's category (or color; any object) in this image: not scored
            key = (mapped.word_class, mapped.target)
            if key not in distances:
                distances[key] = ndimage.distance_transform_edt(~mask)
            heatmaps = {name: result.method_maps[name][0][mapped.index].numpy() for name in methods}
            scores, center, random = _scores_with_baselines(
                heatmaps, mask, _word_seed(self.config.seed, image_id, source, mapped.index), distances[key])
            if mapped.word_class != "function":  # reports show object words' maps (the first method's)
                self._keep_map(f"{image_id}/{source}/{mapped.index}", heatmaps[methods[0]])
            for name in methods:
                lines.append({"kind": "word", "batch": k, "image_id": image_id, "source": source,
                              "caption": result.caption, "word_index": mapped.index, "word": mapped.word,
                              "class": mapped.word_class, "target": mapped.target, "method": name,
                              "logprob": result.word_logprobs[mapped.index], "model": scores[name],
                              "center": center, "random": random})
        return lines

    def _score_question(self, k: int, image_id: int, pil, question: dict) -> list[dict]:
        object_ids = question.get("object_ids") or []
        if not object_ids:
            return []
        mask = self.data.object_mask(object_ids, image_id, pil.height, pil.width)
        if mask is None:
            return [Skip("question", question.get("question_id"), "its objects have no usable mask").as_line(k)]
        methods = self.methods("vqa")
        try:  # every method from one forward and backward
            result = self.vqa.explain(pil, question["question"], method=methods, layer=self.config.layer)
        except ValueError as error:
            return [Skip("question", question.get("question_id"), str(error)).as_line(k)]
        truth = question.get("multiple_choice_answer")
        heatmaps = {name: result.method_maps[name][0][0].numpy() for name in methods}
        scores, center, random = _scores_with_baselines(
            heatmaps, mask, _word_seed(self.config.seed, image_id, "vqa", int(question["question_id"])))
        self._keep_map(f"{image_id}/vqa/{question['question_id']}", heatmaps[methods[0]])
        return [{"kind": "answer", "batch": k, "image_id": image_id, "question_id": question["question_id"],
                 "question": question["question"], "question_type": question.get("question_type", ""),
                 "method": name, "answer": result.answer, "truth": truth, "correct": result.answer == truth,
                 "model": scores[name], "center": center, "random": random} for name in methods]

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
            methods = self.methods("captions")  # every method from each explain call of the studies
            if self.config.sanity_images:
                summary["sanity"] = randomization_study(self.captioner, [p for _, p in images[:self.config.sanity_images]],
                                                        method=methods, layer=self.config.layer)
            if self.config.faithfulness_images:
                summary["faithfulness"] = faithfulness_study(
                    self.captioner, [p for _, p in images[:self.config.faithfulness_images]],
                    method=methods, layer=self.config.layer, seed=self.config.seed)
        write_reports(self.out, summary)
        return summary


def run_eval(config: EvalConfig, progress: bool = True) -> dict | None:
    from . import distributed

    rank, world = distributed.setup()
    try:
        return Evaluation(config, rank, world, progress).run()
    finally:
        distributed.teardown(world)


__all__ = ["EvalConfig", "Evaluation", "run_eval", "read_complete_batches", "METRICS"]
