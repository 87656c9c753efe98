"""Plots of an evaluation run: score distributions per word class against the baselines."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

WHO = (("model", "tab:red"), ("center", "tab:gray"), ("random", "tab:blue"))


def plot_distributions(lines: list[dict], out: Path) -> list[Path]:
    """For each (source, word class) and for VQA answers: energy histograms and pointing bars."""
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
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for row, (name, rows) in enumerate(sorted(groups.items())):
        ax = axes[row, 0]
        bins = np.linspace(0, 1, 21)
        for who, color in WHO:
            ax.hist([r[who]["energy"] for r in rows], bins=bins, alpha=0.45, color=color, label=who)
        ax.set_title(f"{name}: energy inside the mask (n={len(rows)})", fontsize=9)
        ax.set_xlabel("share of map mass inside the mask")
        ax.legend(fontsize=8)
        ax = axes[row, 1]
        metrics = ["pointing_0px", "pointing_15px", "box_correct"]
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
