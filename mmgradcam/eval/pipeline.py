"""``mmgradcam eval``: explain a model over a COCO-format data set and score every mappable word.

This module is the loop; the parts live beside it: config.py (the arguments), shards.py (shard
files, resume, merge), scoring.py (a result to lines), metrics.py (the metric table),
vqa_annotations.py, thumbnails.py, studies.py and summary.py.

Work is cut into fixed batches of images (batch k = images k*B .. k*B+B-1 in id order); each is
appended to this process's shard with a ``batch_done`` marker, so a rerun with the same arguments
skips finished batches and ends with exactly the results of an uninterrupted run. Under torchrun,
rank r takes batches k with k % world == r and rank 0 merges the shards into results.jsonl,
summary.json and summary.md.

Several methods (``method="gradcam,hirescam"`` or ``"all"``) come from the same pass: each
batch's captions are explained by ONE ``explain_batch`` call and each question by ONE
``vqa.explain`` call for all methods; every method's map is scored, and the baselines (center
Gaussian, uniform random), which do not depend on the method, once per word. results.jsonl has
one line per scored word (or answer) per method, with a "method" field; the baselines are the
same on every method's line of a word.

Each batch goes through five stages, timed in ``Evaluation.stage_seconds``: decode (images and
masks, by DataLoader workers ahead of the model: loader.py; the main process only waits), generate
(the captions), explain (one forward and one batched backward for all words; VQA questions), score
(every word of the batch at once, with torch on the model's device: scoring.py) and write.
"""
from __future__ import annotations

import dataclasses

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mmgradcam.engine.registry import method_names

from . import shards
from .coco import CocoData, Skip
from .config import EvalConfig
from .loader import BatchDataset, DecodedBatch, DecodedImage, decoded_batches, default_workers
from .metrics import METRICS
from .scoring import AnswerJob, CaptionJob, Scorer, scores_with_baselines, word_seed
from .shards import read_complete_batches
from .thumbnails import Thumbnails
from .vqa_annotations import load_questions
from .words import WordMapper, load_synonyms

# the names this module had before it was split (tests and scripts import them from here)
RESULTS, SHARDS = shards.RESULTS, shards.SHARDS
_word_seed = word_seed
_scores_with_baselines = scores_with_baselines

STAGES = ("decode", "generate", "explain", "score", "write")


class Evaluation:
    """One evaluation run (one process of it under torchrun): models, batches and the loop."""

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
        self.questions = load_questions(config.questions, config.answers, self.data) if config.questions else {}
        if config.method is not None:
            method_names(config.method)  # an unknown name fails now, before any work
        self.thumbnails = Thumbnails()
        self.scorer = Scorer(self.mapper, config.seed, config.function_words, keep=self.thumbnails.keep)
        self._captioner = None
        self._vqa = None
        self._methods: dict[str, list[str]] = {}
        # seconds spent in each stage by the batch loop (cheap perf_counter sums; results do not
        # depend on them), and the loop's own wall time: the benchmark's breakdown
        self.stage_seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.loop_seconds = 0.0

    # models are loaded lazily so a finished run can be re-summarized without them
    @property
    def captioner(self):
        if self._captioner is None:
            from mmgradcam.tasks import captioning

            self._captioner = captioning.load(self.config.model, device=self.config.device, dtype=self.config.dtype,
                                              prompt=self.config.prompt)
        return self._captioner

    @property
    def vqa(self):
        if self._vqa is None:
            from mmgradcam.tasks import vqa

            self._vqa = vqa.load(self.config.vqa_model, device=self.config.device, dtype=self.config.dtype)
        return self._vqa

    def methods(self, task: str) -> list[str]:
        """The methods explained for ``task`` ("captions" or "vqa"): ``config.method``, or the
        model's own default method when it is None (loading the model)."""
        if task not in self._methods:
            model = self.captioner if task == "captions" else self.vqa
            spec = self.config.method if self.config.method is not None else model.default_method
            # "all": every method that applies to the model (the attention methods where it has attention)
            self._methods[task] = model.method_choice(spec)
        return self._methods[task]

    @property
    def workers(self) -> int:
        """Decoding processes: ``config.workers``, or ``default_workers()`` when None."""
        return default_workers() if self.config.workers is None else self.config.workers

    @property
    def device(self) -> torch.device:
        """Where the models run, and where scoring runs (the CPU for Apple MPS: no float64 there)."""
        from mmgradcam.engine.device import resolve_device

        model = self.captioner if not self.config.skip_captions else self.vqa
        device = model.device
        return device if device.type != "mps" else resolve_device("cpu")

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] += time.perf_counter() - start

    @property
    def batches(self) -> list[list[int]]:
        size = self.config.batch_size
        return [self.image_ids[k:k + size] for k in range(0, len(self.image_ids), size)]

    def run(self) -> dict | None:
        """Process this rank's unfinished batches; rank 0 then merges and summarizes."""
        from . import distributed

        self.out.mkdir(parents=True, exist_ok=True)
        identity = self.config.identity()
        if self.rank == 0:  # rank 0 writes run.json first; the others check it after the barrier
            shards.check_run_file(self.out, identity, write=True)
        distributed.barrier(self.world)
        if self.rank != 0:
            shards.check_run_file(self.out, identity, write=False)
        shard, todo = shards.resume(self.out, self.rank, self.world, len(self.batches))
        images_done = 0
        start = time.time()
        bar = None
        if self.progress:
            from tqdm import tqdm

            total = sum(len(self.batches[k]) for k in range(len(self.batches)) if k % self.world == self.rank)
            bar = tqdm(total=total, initial=total - sum(len(self.batches[k]) for k in todo), unit="img",
                       desc=f"eval ({self.world} process{'es' if self.world > 1 else ''})")
        if todo:  # models loaded before the loop: stage_seconds then accounts for its whole time
            if not self.config.skip_captions:
                self.methods("captions")
            if self.questions:
                self.methods("vqa")
        loop_start = time.perf_counter()
        for decoded in self._decoded(todo):
            k = decoded.index
            lines = self._process(decoded)
            with self._stage("write"):  # the maps first, so a resumed batch rewrites the same file
                self.thumbnails.save(self.out, k)
                shards.append_batch(shard, lines, k)
            images_done += len(self.batches[k])
            if bar is not None:
                bar.update(len(self.batches[k]))
                bar.set_postfix(img_s=f"{images_done / max(time.time() - start, 1e-9):.1f}")
        self.loop_seconds += time.perf_counter() - loop_start
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

    def dataset(self) -> BatchDataset:
        """The run's batches as a dataset of decoded batches (loader.py)."""
        preprocess = None if self.config.skip_captions else self.captioner.preprocess
        return BatchDataset(self.data, self.batches, preprocess, self.questions)

    def _decoded(self, todo: list[int]) -> Iterator[DecodedBatch]:
        """Batches ``todo`` decoded (by workers ahead of the model), on the model's device; the
        time the loop waits for them and their transfer is the decode stage."""
        if not todo:
            return
        device = self.scorer.device = self.device
        pin = device.type == "cuda"  # page-locked batches copy to the GPU asynchronously
        batches = decoded_batches(self.dataset(), todo, self.workers, pin_memory=pin)
        while True:
            with self._stage("decode"):
                decoded = next(batches, None)
                if decoded is not None:
                    decoded.to(device, non_blocking=pin)
            if decoded is None:
                return
            yield decoded

    def process_batch(self, k: int) -> list[dict]:
        """Explain and score one batch, decoded here: its results lines (skips included); its maps
        are saved."""
        self.scorer.device = self.device
        with self._stage("decode"):
            decoded = self.dataset()[k].to(self.scorer.device)
        lines = self._process(decoded)
        with self._stage("write"):
            self.thumbnails.save(self.out, k)
        return lines

    def _process(self, decoded: DecodedBatch) -> list[dict]:
        """Generate, explain and score one decoded batch: its results lines (skips included)."""
        k, loaded = decoded.index, decoded.images
        lines = [s.as_line(k) for s in decoded.skipped]
        if not loaded:
            return lines
        for image in loaded:
            lines += [s.as_line(k) for s in image.bad]
        parts: list[list[dict] | CaptionJob | AnswerJob] = []  # in line order; jobs scored together
        if not self.config.skip_captions:
            parts += self._caption_jobs(loaded)
        for image in loaded:
            for n, question in enumerate(self.questions.get(image.image_id, [])):
                parts.append(self._question_job(k, image, n, question))
        jobs = [part for part in parts if not isinstance(part, list)]
        with self._stage("score"):
            scored = iter(self.scorer.score_jobs(k, jobs))
            for part in parts:
                lines += part if isinstance(part, list) else next(scored)
        return lines

    def _caption_jobs(self, loaded: list[DecodedImage]) -> list[CaptionJob]:
        captioner = self.captioner
        with self._stage("generate"):
            generated = captioner.generate_from_pixels(torch.cat([image.pixel_values for image in loaded]),
                                                       geometries=[image.geometry for image in loaded])
        for image, caption in zip(loaded, generated):
            if not caption.strip():
                raise ValueError(f"the model generated an empty caption for image {image.image_id}")
        jobs = [(image, caption, "generated") for image, caption in zip(loaded, generated)]
        if self.config.references:
            jobs += [(image, self.data.captions[image.image_id][0], "reference")
                     for image in loaded if self.data.captions.get(image.image_id)]
        # only words that can be scored are explained (fewer targets, a cheaper batched backward),
        # and every method from this one call
        function_words = self.config.function_words
        methods = self.methods("captions")
        with self._stage("explain"):
            results = captioner.explain_pixels(
                torch.cat([j[0].pixel_values for j in jobs]), [j[0].geometry for j in jobs], [j[1] for j in jobs],
                method=methods, layer=self.config.layer,
                select=lambda words: [m.index for m in self.mapper.classify(words, function_words)],
                max_targets_per_backward=self.config.max_targets_per_backward)
        return [CaptionJob(image.image_id, source, result, image.masks, methods)
                for (image, _, source), result in zip(jobs, results)]

    def _question_job(self, k: int, image: DecodedImage, n: int, question: dict) -> list[dict] | AnswerJob:
        if not question.get("object_ids"):
            return []
        key = image.answer_keys.get(n)
        if key is None:
            return [Skip("question", question.get("question_id"), "its objects have no usable mask").as_line(k)]
        methods = self.methods("vqa")
        try:  # every method from one forward and backward
            with self._stage("explain"):
                result = self.vqa.explain(image.image, question["question"], method=methods, layer=self.config.layer,
                                          max_targets_per_backward=self.config.max_targets_per_backward)
        except ValueError as error:
            return [Skip("question", question.get("question_id"), str(error)).as_line(k)]
        return AnswerJob(image.image_id, question, result, image.masks, key, methods)

    def _perturbation_items(self, count: int) -> list[tuple[object, str]]:
        """The first ``count`` questions of the run's images (id order) with their images."""
        items = []
        for image_id in self.image_ids:
            questions = self.questions.get(image_id, [])
            if not questions:
                continue
            loaded, _ = self._load_images([image_id])
            for _, pil in loaded:
                items += [(pil, q["question"]) for q in questions[:count - len(items)]]
            if len(items) >= count:
                break
        return items

    # ------------------------------------------------------------------------- merge and summary
    def merged_lines(self) -> Iterator[dict]:
        return shards.merged_lines(self.out)

    def finish(self) -> dict:
        """Merge the shards into results.jsonl, summarize, run the studies, write summary.json/md."""
        from .studies import run_perturbation, run_studies
        from .summary import summarize, write_reports

        lines = list(self.merged_lines())
        shards.write_results(self.out, lines)
        missing = len(self.batches) - len(shards.all_complete_batches(self.out))
        summary = summarize(lines, self.data.skipped, images=len(self.image_ids), incomplete_batches=missing,
                            config=self.config)
        config = self.config
        if config.sanity_images or config.faithfulness_images:
            images, _ = self._load_images(self.image_ids[:max(config.sanity_images, config.faithfulness_images)])
            summary.update(run_studies(self.captioner, [p for _, p in images], self.methods("captions"),
                                       config.layer, config.seed, config.sanity_images, config.faithfulness_images))
        if config.perturbation_questions and self.questions:
            summary.update(run_perturbation(self.vqa, self._perturbation_items(config.perturbation_questions),
                                            self.methods("vqa"), config.layer, config.seed))
        write_reports(self.out, summary)
        return summary


def run_eval(config: EvalConfig, progress: bool = True) -> dict | None:
    """Run (or resume) an evaluation, one process or one torchrun rank; rank 0 returns the summary."""
    from . import distributed

    rank, world = distributed.setup(config.device)
    if world > 1:  # each rank runs its models on its own device (its local GPU under NCCL)
        config = dataclasses.replace(config, device=str(distributed.local_device()))
    try:
        return Evaluation(config, rank, world, progress).run()
    finally:
        distributed.teardown(world)


__all__ = ["EvalConfig", "Evaluation", "run_eval", "read_complete_batches", "METRICS"]
