"""Reports of an eval run directory: figures (categories, best/worst gallery) and the HTML page."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmgradcam.eval.metrics import COMPACT, RANK_BY, WORDS, get_metric, metric_keys
from mmgradcam.eval.summary import study_markdown

from .html import _page, esc, heatmap_uri, png_data_uri

MAX_IMAGE_VIEWS = 120


def read_run(out: Path) -> tuple[dict, dict, list[dict], dict[str, np.ndarray]]:
    summary = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "run.json").read_text())
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    maps: dict[str, np.ndarray] = {}
    for path in sorted((out / "maps").glob("batch*.npz")) if (out / "maps").is_dir() else []:
        with np.load(path) as archive:
            maps.update({key: archive[key] for key in archive.files})
    return summary, run, lines, maps


def first_method_lines(lines: list[dict]) -> list[dict]:
    """The lines of each kind's first method (the one whose maps the run keeps), and the others
    (skips). Runs with several methods have one line per word per method."""
    first: dict[str, str] = {}
    for line in lines:
        if line["kind"] in ("word", "answer"):
            first.setdefault(line["kind"], line.get("method", "?"))
    return [line for line in lines if line["kind"] not in first or line.get("method", "?") == first[line["kind"]]]


def write_eval_plots(out: Path) -> list[Path]:
    """The figures that need only the run's files: score distributions (first method) and the
    method x word class bars."""
    from .eval_plots import plot_distributions, plot_methods

    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return plot_distributions(first_method_lines(lines), out / "plots") + plot_methods(summary, out / "plots")


def _present(keys, scores: dict | None) -> list[str]:
    """``keys`` that a run's scores hold (a run written before a metric was registered lacks it)."""
    return [key for key in keys if scores is None or key in scores]


def _images_and_masks(run: dict, image_ids: set[int]):
    from mmgradcam.eval.coco import CocoData
    from mmgradcam.tasks.geometry import load_image

    data = CocoData.load(run["instances"], run["images"])
    images, masks = {}, {}
    for image_id in sorted(image_ids):
        if image_id not in data.images:
            continue
        try:
            image = load_image(data.images[image_id]["path"])
        except (OSError, ValueError):
            continue
        images[image_id] = image
        by_category, by_color, _ = data.target_masks(image_id, image.height, image.width)
        masks.update({(image_id, name): mask for name, mask in {**by_category, **by_color}.items()})
    return images, masks


def eval_figures(out: Path) -> list[Path]:
    from .eval_plots import plot_categories, plot_gallery

    summary, run, lines, maps = read_run(out)
    lines = first_method_lines(lines)
    written = write_eval_plots(out) + plot_categories(summary, out / "plots")
    words = [line for line in lines if line["kind"] == "word" and line["class"] != "function"]
    ranked = sorted(words, key=lambda line: line["model"][RANK_BY])
    ids = {line["image_id"] for line in ranked[:6] + ranked[-6:]}
    images, masks = _images_and_masks(run, ids)
    gallery = plot_gallery(lines, maps, images, masks, out / "plots")
    return written + ([gallery] if gallery else [])


def eval_page(out: Path, max_images: int = MAX_IMAGE_VIEWS) -> str:
    """A sortable table of every scored word (and answer) linking to views of the images."""
    summary, run, lines, maps = read_run(out)
    scored = [line for line in first_method_lines(lines) if line["kind"] in ("word", "answer")]
    # the table's columns: the metrics of the WORDS view, then the baselines on the ranking metric
    rank = get_metric(RANK_BY)
    columns = [("model", get_metric(key)) for key in _present(metric_keys(WORDS), scored[0]["model"] if scored else None)]
    columns += [("center", rank), ("random", rank)]
    # image views for the best and worst scored items first, up to max_images images
    ranked = sorted(scored, key=lambda line: line["model"][RANK_BY])
    chosen: list[int] = []
    for line in [x for pair in zip(ranked, ranked[::-1]) for x in pair]:
        if line["image_id"] not in chosen and len(chosen) < max_images:
            chosen.append(line["image_id"])
    images, _ = _images_and_masks(run, set(chosen))
    views, sections = {}, []
    for image_id in chosen:
        if image_id not in images:
            continue
        image = images[image_id]
        image.thumbnail((256, 256))
        items = [line for line in scored if line["image_id"] == image_id]
        keys = [f"{image_id}/{line.get('source', 'vqa')}/{line.get('word_index', line.get('question_id'))}" for line in items]
        items = [(line, key) for line, key in zip(items, keys) if key in maps]
        if not items:
            continue
        labels = [f"{line.get('word', line.get('answer'))} [{line.get('source', 'vqa')}] "
                  f"{rank.label} {line['model'][RANK_BY]:.2f}" for line, _ in items]
        views[str(image_id)] = {"maps": {"map": [heatmap_uri(maps[key].astype(np.float32)) for _, key in items]},
                                "methods": ["map"], "labels": labels}
        buttons = "".join(f'<button class="word" data-index="{k}">{esc(line.get("word", line.get("answer")))}</button>'
                          for k, (line, _) in enumerate(items))
        caption = esc(items[0][0].get("caption", items[0][0].get("question", "")))
        sections.append(
            f'<section class="image" id="image-{image_id}"><h3>image {image_id}</h3><p>{caption}</p>'
            f'<div data-view="{image_id}"><div class="buttons">{buttons}</div>'
            f'<p class="muted">showing: <span class="shown"></span></p>'
            f'<div class="view"><img class="base" alt="image" src="{png_data_uri(image)}" style="width:{image.width}px;height:{image.height}px">'
            f'<img class="overlay" alt="map" src="" style="opacity:0.5;width:{image.width}px;height:{image.height}px"></div>'
            f'<p><label>opacity <input class="opacity" type="range" min="0" max="100" value="50"></label></p></div></section>')
    linked = {int(s) for s in views}
    rows = []
    for line in scored:
        link = f'<a href="#image-{line["image_id"]}">{line["image_id"]}</a>' if line["image_id"] in linked \
            else str(line["image_id"])
        word = line.get("word", line.get("answer", ""))
        rows.append("<tr>" + f'<td data-value="{line["image_id"]}">{link}</td>'
                    f"<td>{esc(word)}</td><td>{esc(line.get('class', 'answer'))}</td>"
                    f"<td>{esc(line.get('target', line.get('question_type', '')))}</td>"
                    + "".join(f'<td data-value="{line[who][m.key]:.4f}">{line[who][m.key]:.3f}</td>'
                              for who, m in columns) + "</tr>")
    headers = "".join(f"<th>{esc(m.label if who == 'model' else f'{who} {m.short_label()}')}</th>"
                      for who, m in columns)
    table = ("<table class='sortable' id='words'><thead><tr><th>image</th><th>word / answer</th><th>class</th>"
             f"<th>category</th>{headers}</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    per_category = summary.get("per_category", {})
    first_aggregate = next((agg for categories in per_category.values() for agg in categories.values()), None)
    compact = [get_metric(key) for key in _present(metric_keys(COMPACT), first_aggregate)]
    category_rows = []
    for source, categories in per_category.items():
        for key, agg in categories.items():
            cells = "".join(f"<td data-value='{s[0]:.4f}'>{100 * s[0]:.1f} [{100 * s[1]:.1f}, {100 * s[2]:.1f}]</td>"
                            for s in (agg[m.key]["model"] for m in compact))
            category_rows.append(f"<tr><td>{esc(source)}</td><td>{esc(key)}</td><td data-value='{agg['n']}'>{agg['n']}</td>"
                                 f"{cells}</tr>")
    methods = _method_table_html(summary)
    categories = ("<table class='sortable' id='categories'><thead><tr><th>captions</th><th>category</th><th>n</th>"
                  + "".join(f"<th>{esc(m.label)} (95% CI)</th>" for m in compact) + "</tr></thead><tbody>"
                  + "".join(category_rows) + "</tbody></table>")
    shown = summary.get("methods", {})
    method = ", ".join(dict.fromkeys(names[0] for names in shown.values() if names)) or run.get("method")
    body = (f"<h1>Evaluation</h1><p>{summary['images']} images, {summary['words_scored']} scored words, "
            f"{summary['answers_scored']} scored answers, model {esc(run.get('model'))}, method {esc(method)}"
            f" (the words, categories and image views below; every method in the first table)."
            f" Click a column header to sort; image ids link to their views.</p>{methods}"
            f"{markdown_sections_html(study_markdown(summary))}<h2>Categories</h2>{categories}"
            f"<h2>Scored words and answers</h2>{table}<h2>Images</h2>{''.join(sections)}")
    return _page("mmgradcam evaluation", body, {"views": views}, (256, 256))


def _method_table_html(summary: dict) -> str:
    """The method x word class table (with both baselines per class) as a sortable table."""
    table = summary.get("method_table")
    if not table or not table.get("classes"):
        return ""
    metrics = table["metrics"]
    flags = table.get("sanity", {})

    def cells(stats: dict) -> str:
        return "".join(f"<td data-value='{stats[m][0]:.4f}'>{100 * stats[m][0]:.1f} "
                       f"[{100 * stats[m][1]:.1f}, {100 * stats[m][2]:.1f}]</td>" for m in metrics)

    rows = []
    for word_class in table["classes"]:
        for method, classes in table["methods"].items():
            if word_class in classes:
                flag = " ⚠" if flags.get(method, {}).get("flagged") else ""
                rows.append(f"<tr><td>{esc(word_class)}</td><td>{esc(method)}{flag}</td>"
                            f"<td data-value='{classes[word_class]['n']}'>{classes[word_class]['n']}</td>"
                            f"{cells(classes[word_class])}</tr>")
        base = table["baselines"][word_class]
        for who in ("center", "random"):
            rows.append(f"<tr><td>{esc(word_class)}</td><td><i>{who} baseline</i></td>"
                        f"<td data-value='{base['n']}'>{base['n']}</td>{cells(base[who])}</tr>")
    note = (f"<p class='muted'>⚠: maps keep mean |Spearman ρ| ≥ {esc(table.get('sanity_threshold'))} with the "
            "trained model's after every weight is randomized.</p>") if flags else ""
    return ("<h2>Methods × word classes</h2><p class='muted'>Own captions and VQA answers, 95% bootstrap CIs; "
            "function words are scored against the union of all objects in the image.</p>" + note +
            "<table class='sortable' id='methods'><thead><tr><th>words</th><th>method</th><th>n</th>"
            + "".join(f"<th>{esc(m)}</th>" for m in metrics) + "</tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def markdown_sections_html(lines: list[str]) -> str:
    """The summary's markdown sections (``## heading``, a paragraph, a pipe table) as HTML, so that
    summary.md and report.html show the same study tables from one source."""
    html, rows = [], []

    def inline(text: str) -> str:
        parts = esc(text).split("**")
        return "".join(f"<b>{part}</b>" if k % 2 else part for k, part in enumerate(parts))

    def flush() -> None:
        if rows:
            head, body = rows[0], rows[1:]
            html.append("<table class='sortable'><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head)
                        + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row)
                                                           + "</tr>" for row in body) + "</tbody></table>")
            rows.clear()

    for line in "\n".join(lines).splitlines():
        line = line.strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):  # the header rule
                rows.append(cells)
            continue
        flush()
        if line.startswith("## "):
            html.append(f"<h2>{inline(line[3:])}</h2>")
        elif line:
            html.append(f"<p class='muted'>{inline(line)}</p>")
    flush()
    return "".join(html)
