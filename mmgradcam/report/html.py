"""One self-contained HTML file per result: images inline, no network, every user string escaped.

- caption results: the caption as clickable words; the clicked (or hovered) word's map over the
  image; an opacity slider; a method switch when several methods were computed.
- VQA results: the question, its top answers as buttons, each explained answer's map; a method
  switch when several methods were computed.
- eval runs: a sortable table of scored words (and a per-category table) linking to image views.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.view {{ position: relative; display: inline-block; }}
.view img {{ display: block; width: {width}px; height: {height}px; image-rendering: auto; }}
.view img.overlay {{ position: absolute; left: 0; top: 0; }}
button.word, button.answer {{ font-size: 1.05em; margin: 2px; padding: 3px 7px; border: 1px solid #999;
  background: #f4f4f4; border-radius: 4px; cursor: pointer; }}
button.active {{ background: #ffd34d; border-color: #b38600; }}
.muted {{ color: #777; font-size: 0.9em; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ cursor: pointer; background: #eee; }}
section.image {{ margin: 2em 0; border-top: 1px solid #ccc; padding-top: 1em; }}
</style></head><body>
{body}
<script>
const DATA = {data};
{script}
</script>
</body></html>
"""

VIEW_SCRIPT = """
function setupView(root) {
  const view = DATA.views[root.dataset.view];
  const overlay = root.querySelector('img.overlay');
  const slider = root.querySelector('input.opacity');
  const methodSelect = root.querySelector('select.method');
  const buttons = Array.from(root.querySelectorAll('button[data-index]'));
  let current = 0;
  function show(index) {
    current = index;
    const method = methodSelect ? methodSelect.value : view.methods[0];
    overlay.src = view.maps[method][index];
    overlay.dataset.index = String(index);
    overlay.dataset.method = method;
    buttons.forEach(b => b.classList.toggle('active', Number(b.dataset.index) === index));
    const label = root.querySelector('.shown');
    if (label) { label.textContent = view.labels[index]; }
  }
  buttons.forEach(b => {
    b.addEventListener('click', () => show(Number(b.dataset.index)));
    b.addEventListener('mouseenter', () => show(Number(b.dataset.index)));
  });
  if (slider) { slider.addEventListener('input', () => { overlay.style.opacity = String(slider.value / 100); }); }
  if (methodSelect) { methodSelect.addEventListener('change', () => show(current)); }
  show(0);
}
document.querySelectorAll('[data-view]').forEach(setupView);
document.querySelectorAll('table.sortable').forEach(table => {
  table.querySelectorAll('th').forEach((th, column) => {
    th.addEventListener('click', () => {
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      const ascending = th.dataset.order !== 'asc';
      th.dataset.order = ascending ? 'asc' : 'desc';
      rows.sort((a, b) => {
        const x = a.cells[column].dataset.value ?? a.cells[column].textContent;
        const y = b.cells[column].dataset.value ?? b.cells[column].textContent;
        const nx = Number(x), ny = Number(y);
        const cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return ascending ? cmp : -cmp;
      });
      rows.forEach(r => body.appendChild(r));
    });
  });
});
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def script_json(data: object) -> str:
    """JSON safe inside <script>: no '</' or '<!--' can close or confuse the element."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_uri(heatmap: np.ndarray, vmax: float | None = None, cmap: str = "jet") -> str:
    """A colored RGBA PNG of a map (transparent where the map is zero)."""
    from matplotlib import colormaps

    values = np.asarray(heatmap, dtype=np.float64)
    top = vmax if vmax is not None else float(values.max())
    normalized = np.clip(values / top, 0, 1) if top > 0 else np.zeros_like(values)
    rgba = (colormaps[cmap](normalized) * 255).astype(np.uint8)
    rgba[..., 3] = (np.sqrt(normalized) * 255).astype(np.uint8)
    return png_data_uri(Image.fromarray(rgba, "RGBA"))


def _page(title: str, body: str, data: dict, size: tuple[int, int]) -> str:
    height, width = size
    scale = min(1.0, 640 / max(height, width)) if max(height, width) > 640 else max(1.0, 320 / max(height, width))
    return TEMPLATE.format(title=esc(title), body=body, data=script_json(data), script=VIEW_SCRIPT,
                           width=round(width * scale), height=round(height * scale))


def _view_block(view_id: str, image_uri: str, buttons: str, methods: list[str], header: str) -> str:
    switch = ""
    if len(methods) > 1:
        options = "".join(f'<option value="{esc(m)}">{esc(m)}</option>' for m in methods)
        switch = f' <label>method <select class="method">{options}</select></label>'
    return (f'<div data-view="{esc(view_id)}">{header}<div class="buttons">{buttons}</div>'
            f'<p class="muted">showing: <span class="shown"></span></p>'
            f'<div class="view"><img class="base" alt="image" src="{image_uri}">'
            f'<img class="overlay" alt="map" src="" style="opacity:0.5"></div>'
            f'<p><label>opacity <input class="opacity" type="range" min="0" max="100" value="50"></label>{switch}</p></div>')


def caption_page(image: Image.Image, summary: dict, maps_by_method: dict[str, np.ndarray],
                 common_scale: bool = False) -> str:
    """HTML for a caption result: ``maps_by_method[m]`` is (n_words, H, W)."""
    words = [w["word"] for w in summary["words"]]
    logprobs = [w["logprob"] for w in summary["words"]]
    methods = list(maps_by_method)
    maps = {}
    for method, array in maps_by_method.items():
        vmax = float(array.max()) if common_scale else None
        maps[method] = [heatmap_uri(array[j], vmax) for j in range(len(words))]
    labels = [f"{w} (log-prob {lp:.2f})" for w, lp in zip(words, logprobs)]
    buttons = "".join(f'<button class="word" data-index="{j}" title="log-prob {lp:.3f}">{esc(w)}</button>'
                      for j, (w, lp) in enumerate(zip(words, logprobs)))
    header = (f"<h1>Caption</h1><p>{esc(summary['caption'])}</p>"
              f"<p class='muted'>model {esc(summary.get('model', '?'))}, layer {esc(summary.get('layer', '?'))}"
              f"{', counterfactual' if summary.get('counterfactual') else ''}. Click or point at a word.</p>")
    body = _view_block("caption", png_data_uri(image), buttons, methods, header)
    return _page(f"Caption: {summary['caption']}", body, {"views": {"caption": {"maps": maps, "methods": methods,
                                                                                 "labels": labels}}}, image.size[::-1])


def vqa_page(image: Image.Image, summary: dict, maps: np.ndarray | dict[str, np.ndarray],
             contrast_map: np.ndarray | dict[str, np.ndarray | None] | None = None) -> str:
    """HTML for a VQA result: ``maps`` (K, H, W), or {method: (K, H, W)} for a method switch (and
    ``contrast_map`` (H, W) or {method: (H, W)} alike)."""
    entries = summary["explained"]
    labels = [f"{'why not ' if summary.get('counterfactual') else ''}{e['answer']} (p={e['probability']:.3f})"
              for e in entries]
    if not isinstance(maps, dict):
        maps = {summary.get("method", "gradcam"): maps}
    if not isinstance(contrast_map, dict):
        contrast_map = {method: contrast_map for method in maps}
    methods = list(maps)
    uris = {method: [heatmap_uri(array[k]) for k in range(len(entries))] for method, array in maps.items()}
    if any(contrast_map.get(method) is not None for method in methods):
        labels.append(f"{entries[0]['answer']} rather than {summary.get('contrast')}")
        for method in methods:
            contrast = contrast_map.get(method)
            uris[method].append(heatmap_uri(contrast if contrast is not None else np.zeros(maps[method].shape[1:])))
    buttons = "".join(f'<button class="answer" data-index="{k}">{esc(label)}</button>' for k, label in enumerate(labels))
    top = ", ".join(f"{esc(t['answer'])} ({t['probability']:.2f})" for t in summary.get("top_answers", [])[:5])
    header = (f"<h1>Question</h1><p class='question'>{esc(summary['question'])}</p>"
              f"<p class='muted'>top answers: {top}</p>")
    body = _view_block("vqa", png_data_uri(image), buttons, methods, header)
    return _page(f"VQA: {summary['question']}", body,
                 {"views": {"vqa": {"maps": uris, "methods": methods, "labels": labels}}}, image.size[::-1])


def write(path: Path, page: str) -> Path:
    path.write_text(page, encoding="utf-8")
    return path
