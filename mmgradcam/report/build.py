"""`mmgradcam report RESULT_DIR`: the HTML report (and figures) for a caption, VQA or eval result."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from . import html


def result_kind(directory: Path) -> str:
    if (directory / "summary.json").is_file() and (directory / "results.jsonl").is_file():
        return "eval"
    result = directory / "result.json"
    if not result.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no result: expected result.json (from `mmgradcam caption`"
                                " or `vqa`) or summary.json + results.jsonl (from `mmgradcam eval`)")
    summary = json.loads(result.read_text())
    if "words" in summary:
        return "caption"
    if "explained" in summary:
        return "vqa"
    raise ValueError(f"{result} is neither a caption nor a VQA result")


def build_report(directory: str | Path, common_scale: bool = False) -> Path:
    """Write ``report.html`` into ``directory`` and return its path."""
    directory = Path(directory)
    kind = result_kind(directory)
    if kind == "eval":
        from .eval_report import eval_figures, eval_page

        eval_figures(directory)
        page = eval_page(directory)
    else:
        summary = json.loads((directory / "result.json").read_text())
        image_path = directory / "image.png"
        if not image_path.is_file():
            raise FileNotFoundError(f"{image_path} is missing: the report shows maps over the image")
        image = Image.open(image_path).convert("RGB")
        with np.load(directory / "maps.npz") as arrays:
            if kind == "caption":
                methods = summary.get("methods") or [summary["method"]]
                maps = {m: arrays[f"maps@{m}"] if f"maps@{m}" in arrays.files else arrays["maps"] for m in methods}
                page = html.caption_page(image, summary, maps, common_scale=common_scale)
            else:
                methods = summary.get("methods") or [summary.get("method", "gradcam")]
                maps = {m: arrays[f"maps@{m}"] if f"maps@{m}" in arrays.files else arrays["maps"] for m in methods}
                fallback = arrays["contrast_map"] if "contrast_map" in arrays.files else None
                contrast = {m: arrays[f"contrast_map@{m}"] if f"contrast_map@{m}" in arrays.files else fallback
                            for m in methods}
                page = html.vqa_page(image, summary, maps, contrast)
    return html.write(directory / "report.html", page)
