"""Aggregates of scored words and answers: means with bootstrap CIs beside both baselines."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from .metrics import METRICS, bootstrap_ci

BASELINES = ("model", "center", "random")
HEADLINE = ("pointing_15px", "pointing_0px", "energy", "iou_15", "box_correct")


def _aggregate(rows: list[dict], seed: int = 0) -> dict:
    out = {"n": len(rows)}
    for metric in METRICS:
        out[metric] = {who: list(bootstrap_ci([r[who][metric] for r in rows], seed=seed)) for who in BASELINES}
    return out


def summarize(lines: list[dict], data_skipped, images: int, incomplete_batches: int, config=None) -> dict:
    words = [line for line in lines if line["kind"] == "word"]
    answers = [line for line in lines if line["kind"] == "answer"]
    skips = [s.as_dict() for s in data_skipped]
    skips += [{"kind": line["item"], "id": line["id"], "reason": line["reason"]} for line in lines if line["kind"] == "skip"]
    summary: dict = {"images": images, "incomplete_batches": incomplete_batches, "words_scored": len(words),
                     "answers_scored": len(answers), "captions": {}, "per_category": {}, "skipped": skips}
    if config is not None:
        summary["config"] = asdict(config)
    by_source_class: dict[tuple[str, str], list[dict]] = defaultdict(list)
    by_category: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for word in words:
        by_source_class[(word["source"], word["class"])].append(word)
        by_source_class[(word["source"], "all")].append(word)
        by_category[(word["source"], f"{word['class']}:{word['target']}")].append(word)
    for (source, word_class), rows in sorted(by_source_class.items()):
        summary["captions"].setdefault(source, {})[word_class] = _aggregate(rows)
    for (source, key), rows in sorted(by_category.items()):
        summary["per_category"].setdefault(source, {})[key] = _aggregate(rows)
    if answers:
        by_type: dict[str, list[dict]] = defaultdict(list)
        for answer in answers:
            by_type[answer["question_type"]].append(answer)
            by_type["all"].append(answer)
        summary["vqa"] = {kind: {**_aggregate(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows)}
                          for kind, rows in sorted(by_type.items())}
    return summary


def _cell(stat: list[float], percent: bool = True) -> str:
    mean, low, high = stat
    scale = 100 if percent else 1
    return f"{scale * mean:.1f} [{scale * low:.1f}, {scale * high:.1f}]"


def markdown_tables(summary: dict) -> str:
    """Tables per word class and per category: model against both baselines, 95% bootstrap CIs."""
    out = [f"# Evaluation summary\n\n{summary['images']} images, {summary['words_scored']} scored words, "
           f"{summary['answers_scored']} scored answers, {len(summary['skipped'])} skipped items. "
           "Percentages with 95% bootstrap CIs.\n"]
    for source, classes in summary["captions"].items():
        out.append(f"\n## Caption words ({source})\n")
        out.append("| words | n | metric | model | center baseline | random baseline |\n|---|---:|---|---|---|---|")
        for word_class, agg in classes.items():
            for metric in HEADLINE:
                out.append(f"| {word_class} | {agg['n']} | {metric} | " +
                           " | ".join(_cell(agg[metric][who]) for who in BASELINES) + " |")
    for source, categories in summary["per_category"].items():
        out.append(f"\n## Per category ({source})\n")
        out.append("| category | n | pointing 15px | energy | center pointing | center energy |\n|---|---:|---|---|---|---|")
        for key, agg in categories.items():
            out.append(f"| {key} | {agg['n']} | {_cell(agg['pointing_15px']['model'])} | {_cell(agg['energy']['model'])} | "
                       f"{_cell(agg['pointing_15px']['center'])} | {_cell(agg['energy']['center'])} |")
    if "vqa" in summary:
        out.append("\n## VQA answers (map of the model's answer vs the question's objects)\n")
        out.append("| question type | n | accuracy | pointing 15px | energy | center pointing | random pointing |\n"
                   "|---|---:|---:|---|---|---|---|")
        for kind, agg in summary["vqa"].items():
            out.append(f"| {kind} | {agg['n']} | {100 * agg['accuracy']:.1f} | {_cell(agg['pointing_15px']['model'])} | "
                       f"{_cell(agg['energy']['model'])} | {_cell(agg['pointing_15px']['center'])} | "
                       f"{_cell(agg['pointing_15px']['random'])} |")
    for key in ("sanity", "faithfulness"):
        if key in summary:
            out.append(f"\n## {key}\n\n```\n{json.dumps(summary[key], indent=1)}\n```")
    if summary["skipped"]:
        out.append("\n## Skipped\n")
        out += [f"- {s.get('kind')} {s.get('id')}: {s.get('reason')}" for s in summary["skipped"][:200]]
    return "\n".join(out) + "\n"


def write_reports(out: Path, summary: dict, lines: list[dict]) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
    (out / "summary.md").write_text(markdown_tables(summary))
    from mmgradcam.report.eval_plots import plot_distributions

    plot_distributions(lines, out / "plots")
