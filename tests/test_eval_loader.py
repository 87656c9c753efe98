"""The eval loop close to its bound (issue 15): images and masks decoded ahead of the model by
DataLoader workers, every word of a batch scored at once with torch, stage timers, ``--workers``."""
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from mmgradcam.eval import metrics, shards
from mmgradcam.eval.pipeline import STAGES, Evaluation
from mmgradcam.eval.scoring import CaptionJob, MaskSet, image_masks
from tiny import tiny_eval_config


def random_rows(count=240, shape=(40, 52), seed=0):
    """Maps of every awkward kind (noise, smooth, all zero, constant, negative with ties, isolated
    pixels: segments of equal size) against boxes of every size, some at the border."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(count):
        kind = i % 7
        if kind == 0:
            m = rng.random(shape)
        elif kind == 1:
            m = ndimage.uniform_filter(rng.random(shape), 7)
        elif kind == 2:
            m = np.zeros(shape)
        elif kind == 3:
            m = np.full(shape, 0.3)
        elif kind == 4:
            m = np.round(rng.random(shape) * 4) - 1.5
        elif kind == 5:
            m = (rng.random(shape) > 0.97).astype(float)
        else:  # a coarse grid upsampled, as CAM maps are: values exactly on the paper's thresholds too
            m = np.kron(rng.integers(0, 21, (5, 13)) / 20, np.ones((8, 4)))
        maps.append(m.astype(np.float32) if i % 2 else m)
        mask = np.zeros(shape, dtype=bool)
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        mask[y:y + rng.integers(1, 25), x:x + rng.integers(1, 25)] = True
        masks.append(mask)
    return maps, masks


def assert_scores_close(got: dict, want: dict, tolerance=1e-6):
    assert list(got) == list(want)  # the table's key order
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tolerance), key


def test_batched_scoring_equals_the_numpy_reference():
    maps, masks = random_rows()
    stack = torch.stack([torch.from_numpy(np.asarray(m, dtype=np.float64)) for m in maps])
    mask_stack = torch.from_numpy(np.stack(masks))
    near = torch.from_numpy(np.stack([metrics.near_mask(m) for m in masks]))
    want = [metrics.score_map(m, k) for m, k in zip(maps, masks)]
    # with and without the precomputed neighbourhoods, in one chunk and in chunks of 7 rows
    for got in (metrics.score_batch(stack, mask_stack, near), metrics.score_batch(stack, mask_stack),
                metrics.score_batch(stack, mask_stack, near, max_elements=7 * 40 * 52)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_scores_close(g, w)
        assert got == want  # on the CPU even the last bit: the sums are numpy's (see metrics.score_batch)


def test_a_metric_without_a_batched_version_is_scored_row_by_row():
    maps, masks = random_rows(count=20)
    probe = metrics.Metric("probe_peak", "peak", lambda s: float(s.heatmap.max() + s.mask.sum()))
    with metrics.registered(probe):
        got = metrics.score_batch(torch.stack([torch.from_numpy(np.asarray(m, np.float64)) for m in maps]),
                                  torch.from_numpy(np.stack(masks)))
        want = [metrics.score_map(m, k) for m, k in zip(maps, masks)]
    for g, w in zip(got, want):
        assert_scores_close(g, w)
        assert "probe_peak" in g


def test_batched_scoring_refuses_stacks_of_different_shapes():
    with pytest.raises(ValueError, match="must be equal"):
        metrics.MapsAndMasks(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny split with one missing and one unreadable image; captions (with references) and VQA,
    Grad-CAM and HiResCAM."""
    root = tmp_path_factory.mktemp("loader")
    config = tiny_eval_config(root, 8, references=True, workers=0)
    instances = json.loads(open(config.instances).read())
    images = sorted(instances["images"], key=lambda i: i["id"])
    (root / "data" / "test" / images[1]["file_name"]).unlink()
    (root / "data" / "test" / images[4]["file_name"]).write_bytes(b"not an image")
    return root, config, images


def run(config, out, workers):
    config = type(config)(**{**config.__dict__, "out": str(out), "workers": workers})
    evaluation = Evaluation(config, progress=False)
    evaluation.run()
    return evaluation


def test_workers_0_and_2_give_identical_results(tiny):
    root, config, images = tiny
    evaluations = {w: run(config, root / f"workers{w}", w) for w in (0, 2)}
    texts = {w: (root / f"workers{w}" / "results.jsonl").read_text() for w in evaluations}
    assert texts[0] == texts[2]
    assert {json.loads(line)["kind"] for line in texts[0].splitlines()} == {"word", "answer"}
    # the shards (skips and batch markers included) and the summaries match too
    merged = {w: list(shards.merged_lines(root / f"workers{w}")) for w in evaluations}
    assert merged[0] == merged[2]
    skips = {line["id"]: line["reason"] for line in merged[0] if line["kind"] == "skip" and line["item"] == "image"}
    assert "no such file" in skips[images[1]["id"]] and "not a readable image" in skips[images[4]["id"]]
    summaries = [json.loads((root / f"workers{w}" / "summary.json").read_text()) for w in evaluations]
    assert summaries[0]["skipped"] == summaries[1]["skipped"]
    assert {(s["kind"], s["id"]) for s in summaries[0]["skipped"]} >= {("image", images[1]["id"]),
                                                                       ("image", images[4]["id"])}
    maps = [np.load(root / f"workers{w}" / "maps" / "batch000000.npz") for w in (0, 2)]
    assert sorted(maps[0].files) == sorted(maps[1].files)
    for key in maps[0].files:
        np.testing.assert_array_equal(maps[0][key], maps[1][key])


def test_stage_seconds_cover_the_loop(tiny):
    root, config, _ = tiny
    evaluation = run(config, root / "stages", 0)
    stages = evaluation.stage_seconds
    assert tuple(stages) == STAGES == ("decode", "generate", "explain", "score", "write")
    assert all(stages[name] > 0 for name in STAGES)
    assert sum(stages.values()) == pytest.approx(evaluation.loop_seconds, rel=0.1, abs=0.05)


def test_the_pipeline_scores_each_batch_as_the_numpy_reference_does(tiny):
    """Batched torch scoring (with masks decoded once, in the loader) against the per-word numpy
    Scorer on masks decoded the old way, on every job of a tiny run: equal to 1e-6."""
    root, config, _ = tiny
    config = type(config)(**{**config.__dict__, "out": str(root / "reference"), "workers": 0})
    evaluation = Evaluation(config, progress=False)
    scorer, batched, compared = evaluation.scorer, evaluation.scorer.score_jobs, []

    def both(batch, jobs):
        out = batched(batch, jobs)
        for job, lines in zip(jobs, out):
            h, w = job.masks.masks.shape[1:]
            if isinstance(job, CaptionJob):
                masks, _ = image_masks(evaluation.data, job.image_id, h, w)
                want = scorer.caption(batch, job.image_id, job.source, job.result, masks, job.methods)
            else:
                mask = evaluation.data.object_mask(job.question["object_ids"], job.image_id, h, w)
                want = scorer.answer(batch, job.image_id, job.question, job.result, mask, job.methods)
            compared.append((lines, want))
        return out

    scorer.score_jobs = both
    evaluation.run()
    pairs = [(g, w) for lines, want in compared for g, w in zip(lines, want)]
    assert len(pairs) == sum(len(want) for _, want in compared) == sum(len(lines) for lines, _ in compared)
    assert {g["kind"] for g, _ in pairs} == {"word", "answer"} and len(pairs) > 20
    for got, want in pairs:
        assert {k: v for k, v in got.items() if k not in ("model", "center", "random")} == \
            {k: v for k, v in want.items() if k not in ("model", "center", "random")}
        for part in ("model", "center", "random"):
            assert_scores_close(got[part], want[part])


def test_mask_sets_decode_each_annotation_once(tiny, monkeypatch):
    root, config, _ = tiny
    evaluation = Evaluation(config, progress=False)
    calls = []
    mask_of = type(evaluation.data).mask_of

    def counting(self, ann, height, width):
        calls.append(ann["id"])
        return mask_of(self, ann, height, width)

    monkeypatch.setattr(type(evaluation.data), "mask_of", counting)
    batch = evaluation.dataset()[0]
    annotations = [a["id"] for image in batch.images for a in evaluation.data.annotations.get(image.image_id, [])]
    assert sorted(calls) == sorted(annotations)  # category, color, objects and question masks: one decode each
    assert any(key for image in batch.images for key in image.answer_keys.values())
    for image in batch.images:
        assert isinstance(image.masks, MaskSet) and image.masks.masks.shape == image.masks.near.shape
        assert image.pixel_values is not None and image.geometry is not None


def test_workers_on_the_command_line(tmp_path, monkeypatch):
    from mmgradcam import cli
    from mmgradcam.eval import pipeline

    parser = cli.build_parser()
    base = ["eval", "--instances", "i", "--images", "d", "--captions", "c", "--out", str(tmp_path)]
    assert parser.parse_args(base).workers is None  # the default: min(4, CPUs - 1)
    assert parser.parse_args(base + ["--workers", "0"]).workers == 0
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--workers", "-1"])
    seen = []
    monkeypatch.setattr(pipeline, "run_eval", lambda config, progress: seen.append(config))  # returns None
    args = parser.parse_args(base + ["--workers", "2", "--device", "cpu"])
    assert args.func(args) == 0
    assert seen and seen[0].workers == 2
    assert "workers" not in seen[0].identity()  # who decodes does not change what a resume must match
