"""Matplotlib figures: a map over its image, a caption's per-word grid."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)


def overlay(ax, image: Image.Image | np.ndarray, heatmap: torch.Tensor | np.ndarray, title: str = "",
            vmax: float | None = None, alpha: float = 0.5, cmap: str = "jet"):
    """Draw ``heatmap`` (H, W) over ``image`` on ``ax``; returns the heat image (for a colorbar)."""
    heat = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    ax.imshow(_array(image))
    top = vmax if vmax is not None else (float(heat.max()) if heat.max() > 0 else 1.0)
    shown = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=top)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return shown


# A block of a grid: the label over its image cell, then one overlay per map with its title.
Block = tuple[str, torch.Tensor, Sequence[str]]


def _tick_label(value: float, _position: object = None) -> str:
    """A colorbar tick without matplotlib's offset or "1e-5" multiplier: that text sits above the
    colorbar, where it ran into the next panel's title. Small and large values get a short
    exponent of their own instead ("3.2e-5")."""
    if value == 0:
        return "0"
    if 0.01 <= abs(value) < 1000:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _colorbar(fig, shown, axes, **kwargs) -> None:
    """A colorbar with two ticks, its range's ends (0 and the map's maximum), in short labels."""
    bar = fig.colorbar(shown, ax=axes, **kwargs)
    low, high = shown.get_clim()
    bar.set_ticks([low, high])
    bar.ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_tick_label))
    bar.ax.tick_params(labelsize=6)


def grid_figure(image: Image.Image | np.ndarray, blocks: Sequence[Block], suptitle: str = "",
                common_scale: bool = False, columns: int = 6) -> matplotlib.figure.Figure:
    """Each block starts a new row: its image cell (titled with the block's label), then one
    overlay per map, wrapping after ``columns`` cells; so the k-th map of every block sits in the
    same column. ``common_scale`` puts every map of every block on one color scale."""
    cells = [1 + len(titles) for _, _, titles in blocks]
    cols = min(columns, max(cells))
    block_rows = [math.ceil(c / cols) for c in cells]
    rows = sum(block_rows)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows + (0.4 if suptitle else 0)), squeeze=False,
                             layout="constrained")
    every = torch.cat([maps.reshape(-1) for _, maps, _ in blocks]) if blocks else torch.zeros(1)
    vmax = float(every.max()) if common_scale and float(every.max()) > 0 else None
    shown = None
    first_row = 0
    for (label, maps, titles), count in zip(blocks, block_rows):
        cell = axes[first_row:first_row + count].ravel()
        cell[0].imshow(_array(image))
        cell[0].set_title(label, fontsize=9)
        for k, title in enumerate(titles):
            shown = overlay(cell[k + 1], image, maps[k], title, vmax=vmax)
            if not common_scale:
                _colorbar(fig, shown, cell[k + 1], fraction=0.046, pad=0.02)
        first_row += count
    for ax in axes.flat:
        ax.axis("off")
    if common_scale and shown is not None:
        _colorbar(fig, shown, axes.ravel().tolist(), fraction=0.02, pad=0.01)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return fig


def save_figure(fig: matplotlib.figure.Figure, path: str | Path, dpi: int = 150, formats: Sequence[str] = ()) -> Path:
    """Save as PNG at ``path`` and, for each of ``formats`` ("svg", "pdf"), beside it; close."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    for fmt in formats:
        if fmt != path.suffix.lstrip("."):
            fig.savefig(path.with_suffix("." + fmt), bbox_inches="tight")
    plt.close(fig)
    return path


def map_grid(image: Image.Image | np.ndarray, maps: torch.Tensor, titles: Sequence[str], path: str | Path,
             suptitle: str = "", common_scale: bool = False, columns: int = 6, dpi: int = 150,
             formats: Sequence[str] = ()) -> Path:
    """The image, then one overlay per map; ``common_scale`` puts every map on one color scale.

    Saved as PNG at ``path`` (150 dpi) and, for each of ``formats`` ("svg", "pdf"), beside it."""
    fig = grid_figure(image, [("image", maps, titles)], suptitle=suptitle, common_scale=common_scale,
                      columns=columns)
    return save_figure(fig, path, dpi=dpi, formats=formats)


def caption_blocks(result, compare: str | None = None) -> list[Block]:
    """A CaptionExplanation's maps as grid blocks: its own method's (each word with its
    log-probability) and, when ``compare`` names another method of the same pass, that one's in
    a second block, its label and titles naming the method."""
    titles = [f"{w}  ({lp:.2f})" for w, lp in zip(result.words, result.word_logprobs)]
    if compare is None:
        return [("image", result.maps, titles)]
    other = result.for_method(compare)
    return [(result.method, result.maps, titles),
            (other.method, other.maps, [f"{other.method}: {w}" for w in result.words])]


def caption_figure(image: Image.Image | np.ndarray, result, path: str | Path, common_scale: bool = False,
                   formats: Sequence[str] = (), compare: str | None = None) -> Path:
    """Per-word grid for a CaptionExplanation: each word with its log-probability as the title;
    with ``compare`` (a method computed in the same pass), a second row block of that method."""
    methods = result.method if compare is None else f"{result.method} and {result.for_method(compare).method}"
    suptitle = f"\u201c{result.caption}\u201d  \u2014 {methods}"
    fig = grid_figure(image, caption_blocks(result, compare), suptitle=suptitle, common_scale=common_scale)
    return save_figure(fig, path, formats=formats)


def vqa_figure(image: Image.Image | np.ndarray, result, path: str | Path, common_scale: bool = False,
               formats: Sequence[str] = ()) -> Path:
    """The image and one map per explained answer (and the contrast map), the question as title."""
    titles = [f"{'why not ' if result.counterfactual else ''}{a}  (p={p:.2f})"
              for a, p in zip(result.answers, result.probabilities)]
    maps = result.maps
    if result.contrast_map is not None:
        titles.append(f"{result.answers[0]} rather than {result.contrast}")
        maps = torch.cat([maps, result.contrast_map[None]])
    return map_grid(image, maps, titles, path, suptitle=f"Q: {result.question}", common_scale=common_scale,
                    formats=formats)


def word_panels(image: Image.Image | np.ndarray, words: Sequence[str], gradcam: torch.Tensor,
                guided: torch.Tensor, counterfactual: torch.Tensor, path: str | Path,
                formats: Sequence[str] = ()) -> Path:
    """One row per word: Grad-CAM, Guided Grad-CAM (gray, pixel detail) and the counterfactual map."""
    rows = len(words)
    fig, axes = plt.subplots(rows, 3, figsize=(7.2, 2.5 * rows), squeeze=False)
    for row, word in enumerate(words):
        overlay(axes[row, 0], image, gradcam[row], f"{word}: Grad-CAM")
        detail = guided[row].detach().cpu().numpy()
        axes[row, 1].imshow(detail / detail.max() if detail.max() > 0 else detail, cmap="gray")
        axes[row, 1].set_title(f"{word}: Guided Grad-CAM", fontsize=9)
        axes[row, 1].axis("off")
        overlay(axes[row, 2], image, counterfactual[row], f"{word}: counterfactual", cmap="viridis")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    for fmt in formats:
        if fmt != "png":
            fig.savefig(path.with_suffix("." + fmt), bbox_inches="tight")
    plt.close(fig)
    return path


def adversarial_figure(arrays: dict, result: dict, path: str | Path) -> Path:
    """Original input and map, adversarial input and the ORIGINAL word's map on it, the perturbation."""
    def to_image(x: np.ndarray) -> np.ndarray:
        x = np.transpose(x, (1, 2, 0))
        return (x - x.min()) / max(float(x.max() - x.min()), 1e-8)

    original, adversarial = to_image(arrays["original_input"]), to_image(arrays["adversarial_input"])
    subject = result.get("word", result.get("answer"))
    fig, axes = plt.subplots(1, 5, figsize=(13, 2.9))
    axes[0].imshow(original)
    axes[0].set_title("original", fontsize=9)
    heat = np.asarray(Image.fromarray(arrays["original_map"].astype(np.float32)).resize(original.shape[1::-1]))
    overlay(axes[1], original, heat, f"map of {subject!r}")
    axes[2].imshow(adversarial)
    axes[2].set_title(f"adversarial ({'flipped' if result['flipped'] else 'not flipped'} to {result['target']!r})",
                      fontsize=9)
    heat = np.asarray(Image.fromarray(arrays["adversarial_map"].astype(np.float32)).resize(original.shape[1::-1]))
    overlay(axes[3], adversarial, heat, f"map of {subject!r} on it")
    delta = np.abs(arrays["adversarial_input"] - arrays["original_input"]).max(axis=0)
    axes[4].imshow(delta, cmap="magma")
    axes[4].set_title(f"|perturbation| (L-inf {result['linf_pixels'] * 255:.0f}/255)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
