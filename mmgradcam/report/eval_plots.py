"""Plots of an evaluation run: score distributions per word class against the baselines."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mmgradcam.eval.metrics import COMPACT, LEAD, RANK_BY, get_metric, metric_keys  # noqa: E402

WHO = (("model", "tab:red"), ("center", "tab:gray"), ("random", "tab:blue"))


def plot_distributions(lines: list[dict], out: Path) -> list[Path]:
    """For each (source, word class) and for VQA answers: histograms of the ranking metric (energy)
    and bars of the hit rates (the metric table's binary metrics)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        if line["kind"] == "word":
            groups[f"{line['source']} {line['class']} words"].append(line)
        elif line["kind"] == "answer":
            groups["vqa answers"].append(line)
    if not groups:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rank = get_metric(RANK_BY)
    present = lines[0]["model"] if lines else {}
    hits = [key for key in metric_keys() if get_metric(key).binary and key in present]
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for row, (name, rows) in enumerate(sorted(groups.items())):
        ax = axes[row, 0]
        bins = np.linspace(0, 1, 21)
        for who, color in WHO:
            ax.hist([r[who][RANK_BY] for r in rows], bins=bins, alpha=0.45, color=color, label=who)
        ax.set_title(f"{name}: {rank.label} (n={len(rows)})", fontsize=9)
        ax.set_xlabel(rank.description or rank.label)
        ax.legend(fontsize=8)
        ax = axes[row, 1]
        metrics = hits
        width = 0.27
        for i, (who, color) in enumerate(WHO):
            values = [np.mean([r[who][m] for r in rows]) for m in metrics]
            ax.bar(np.arange(len(metrics)) + (i - 1) * width, values, width, color=color, label=who)
        ax.set_xticks(np.arange(len(metrics)), metrics, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: hit rates", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "distributions.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def plot_methods(summary: dict, out: Path, metrics: tuple[str, ...] | None = None) -> list[Path]:
    """Bars per word class: each method beside the center and random baselines, 95% CI whiskers
    (``metrics``: the metric table's COMPACT view that the run's table holds)."""
    table = summary.get("method_table")
    if not table or not table.get("classes"):
        return []
    if metrics is None:
        metrics = tuple(key for key in metric_keys(COMPACT) if key in table.get("metrics", []))
    if not metrics:
        return []
    classes, methods = table["classes"], list(table["methods"])
    bars = methods + ["center", "random"]
    colors = list(plt.get_cmap("tab10").colors)
    panel_width = max(5.0, 0.25 * len(classes) * len(bars) + 2)
    fig, axes = plt.subplots(1, len(metrics), figsize=(panel_width * len(metrics), 3.8), squeeze=False)
    width = 0.8 / len(bars)
    for ax, metric in zip(axes[0], metrics):
        x = np.arange(len(classes))
        for i, who in enumerate(bars):
            stats = []
            for word_class in classes:
                if who in ("center", "random"):
                    stats.append(table["baselines"][word_class][who][metric])
                else:
                    stats.append(table["methods"][who].get(word_class, {}).get(metric, [np.nan] * 3))
            stats = np.array(stats, dtype=np.float64)
            color = {"center": "tab:gray", "random": "lightgray"}.get(who, colors[i % len(colors)])
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, stats[:, 0], width, color=color, label=who,
                   yerr=[stats[:, 0] - stats[:, 1], stats[:, 2] - stats[:, 0]], capsize=2)
        ax.set_xticks(x, classes, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{metric} per method and word class, 95% bootstrap CIs", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "methods.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def plot_categories(summary: dict, out: Path, metric: str = LEAD) -> list[Path]:
    """Per-category bars of ``metric`` with 95% CI whiskers, model beside the center baseline."""
    written = []
    for source, categories in summary.get("per_category", {}).items():
        names = sorted(categories)
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 3.8))
        x = np.arange(len(names))
        for offset, (who, color) in zip((-0.2, 0.2), (("model", "tab:red"), ("center", "tab:gray"))):
            stats = np.array([categories[n][metric][who] for n in names])
            ax.bar(x + offset, stats[:, 0], 0.4, color=color, label=who,
                   yerr=[stats[:, 0] - stats[:, 1], stats[:, 2] - stats[:, 0]], capsize=3)
        ax.set_xticks(x, [f"{n}\n(n={categories[n]['n']})" for n in names], fontsize=7, rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per category ({source} captions), 95% bootstrap CIs", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"categories_{source}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_gallery(lines: list[dict], maps: dict[str, np.ndarray], images: dict[int, "object"],
                 masks: dict[tuple[int, str], np.ndarray], out: Path, count: int = 6,
                 metric: str = RANK_BY) -> Path | None:
    """The best and worst scored words by ``metric``: image, map, and the mask outline."""
    from PIL import Image

    words = [line for line in lines if line["kind"] == "word"
             and f"{line['image_id']}/{line['source']}/{line['word_index']}" in maps and line["image_id"] in images]
    if not words:
        return None
    ranked = sorted(words, key=lambda line: line["model"][metric])
    chosen = [("worst", w) for w in ranked[:count]] + [("best", w) for w in ranked[::-1][:count]]
    fig, axes = plt.subplots(2, count, figsize=(2.4 * count, 5.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, (kind, line) in enumerate(chosen):
        ax = axes[0 if kind == "best" else 1, n % count]
        image = images[line["image_id"]]
        small = maps[f"{line['image_id']}/{line['source']}/{line['word_index']}"].astype(np.float32)
        heat = np.asarray(Image.fromarray(small).resize(image.size, Image.Resampling.BILINEAR))
        ax.imshow(image)
        ax.imshow(heat, cmap="jet", alpha=0.5)
        mask = masks.get((line["image_id"], line["target"]))
        if mask is not None:
            ax.contour(mask, levels=[0.5], colors="white", linewidths=1.2)
        ax.set_title(f"{kind}: {line['word']} ({metric} {line['model'][metric]:.2f})", fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gallery_{metric}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
