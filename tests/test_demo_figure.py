"""The demo and caption figure: a second row for a compared method (one pass), colorbars whose labels
stay clear of titles and panels, the demo's peak check, and the out-of-domain note in the CLI."""
import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmgradcam.cli import _compare_method, main
from mmgradcam.data.shapes import PLURALS, SHAPES, make_image
from mmgradcam.report import figures
from mmgradcam.tasks.shapes_world import DEMO_SEED, shape_word_peaks

REPO = Path(__file__).resolve().parents[1]
WORDS = "a large red circle to the left of two small blue triangles".split()


def _texts(fig) -> list[tuple[str, object]]:
    """Every drawn title, tick label and offset label ("1e-5") with its bounding box in pixels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        items = [ax.title]
        if ax.axison:  # colorbars; the image panels are drawn without axes
            for axis in (ax.xaxis, ax.yaxis):
                items += [*axis.get_ticklabels(), axis.get_offset_text()]
        found += [(t.get_text(), t.get_window_extent(renderer)) for t in items if t.get_visible() and t.get_text()]
    return found


def _collisions(fig) -> list[tuple[str, str]]:
    texts = _texts(fig)
    panels = [ax.get_window_extent() for ax in fig.axes if ax.images]
    clashes = [(a, b) for i, (a, box) in enumerate(texts) for b, other in texts[i + 1:] if box.overlaps(other)]
    return clashes + [(a, "a panel") for a, box in texts for panel in panels if box.overlaps(panel)]


@pytest.mark.parametrize("count", range(1, 13))
def test_titles_and_colorbars_do_not_overlap(count):
    image = make_image(8, seed=DEMO_SEED)[0]
    gen = torch.Generator().manual_seed(count)
    # Grad-CAM maps of a confident word are ~1e-5: matplotlib put "1e-5" above the colorbar, into
    # the next panel's title; the compared method's maps are of another magnitude entirely
    tiny = torch.rand(count, 128, 128, generator=gen) * 3e-5
    large = torch.rand(count, 128, 128, generator=gen) * 2e4
    titles = [f"{w}  (-0.{k:02d})" for k, w in enumerate(WORDS[:count])]
    fig = figures.grid_figure(image, [("gradcam", tiny, titles),
                                      ("hirescam", large, [f"hirescam: {w}" for w in WORDS[:count]])],
                              suptitle="a caption")
    try:
        assert _collisions(fig) == []
        labels = [text for text, _ in _texts(fig)]
        assert not any(re.fullmatch(r"1e.?\d+", text) for text in labels)  # no offset label
        assert {"gradcam", "hirescam"} <= set(labels)
    finally:
        figures.plt.close(fig)


def test_tick_labels_are_short_and_exact():
    assert [figures._tick_label(v) for v in (0.0, 3.2e-5, 7.3e-3, 0.11, 0.48, 20000.0, 1.0)] == \
        ["0", "3.2e-5", "7.3e-3", "0.11", "0.48", "2e4", "1"]


def _captioner(config: dict, default_method: str = "gradcam") -> SimpleNamespace:
    return SimpleNamespace(config=config, default_method=default_method)


def test_compare_method_choice():
    chosen = _captioner({"compare_method": "layercam"})
    assert _compare_method(chosen, None, "gradcam") == "layercam"  # the config's
    assert _compare_method(chosen, "HiResCAM", "gradcam") == "hirescam"  # the option wins
    assert _compare_method(chosen, "none", "gradcam") is None
    assert _compare_method(chosen, None, "layercam") is None  # already the first row
    assert _compare_method(_captioner({}), None, "gradcam") is None  # no entry: the default is the best
    assert _compare_method(SimpleNamespace(default_method="gradcam"), None, "gradcam") is None  # HF adapters
    assert _compare_method(chosen, None, "guided-gradcam") is None
    with pytest.raises(ValueError, match="CAM --method"):
        _compare_method(chosen, "hirescam", "guided-gradcam")
    with pytest.raises(ValueError, match="unknown method"):
        _compare_method(chosen, "gradcam+++", "gradcam")


def test_demo_second_row_from_the_same_pass(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "one"), "--compare-method", "none"]) == 0
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "two"), "--compare-method", "gradcam"]) == 0
    printed = capsys.readouterr()
    assert "note:" not in printed.out + printed.err  # a shapes-world image: no out-of-domain note
    out = tmp_path / "two"
    summary = json.loads((out / "result.json").read_text())
    arrays = np.load(out / "maps.npz")
    assert summary["methods"] == [summary["method"], "gradcam"] and summary["method"] != "gradcam"
    assert arrays["maps@gradcam"].shape == arrays["maps"].shape
    assert not np.allclose(arrays["maps@gradcam"], arrays["maps"])
    # the second row block doubles the figure's height; the width stays
    one, two = Image.open(tmp_path / "one" / "caption.png").size, Image.open(out / "caption.png").size
    assert abs(two[0] - one[0]) < 0.05 * one[0] and 1.8 * one[1] < two[1] < 2.2 * one[1]
    # what the demo printed is the check run on the maps it wrote (default method first)
    _, objects, _ = make_image(8, seed=DEMO_SEED, size=128)
    words = [str(w) for w in arrays["words"]]
    for peak in shape_word_peaks(words, torch.from_numpy(arrays["maps"]), objects):
        assert f"map of {peak.word!r} peaks at (y={peak.y}, x={peak.x}): " in printed.out
    second = shape_word_peaks(words, torch.from_numpy(arrays["maps@gradcam"]), objects)
    assert f"gradcam: {sum(p.inside for p in second)} of {len(second)} shape nouns' maps peak inside" in printed.out


def test_cli_prints_the_notice_once_for_a_photo(tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "photo.png")
    assert main(["caption", str(tmp_path / "photo.png"), "--out", str(tmp_path / "cap")]) == 0
    printed = capsys.readouterr()
    assert printed.err.count("does not look like the shapes world") == 1 and printed.err.startswith("note: ")
    assert "--model <Hugging Face id or save_pretrained directory>" in printed.err
    assert "shapes world" not in printed.out  # stdout keeps only the results
    assert main(["vqa", str(tmp_path / "photo.png"), "what color is the circle ?", "--out", str(tmp_path / "v")]) == 0
    printed = capsys.readouterr()
    assert printed.err.count("does not look like the shapes world") == 1 and "dandelin/vilt" in printed.err


def test_demo_seeds_script_matches_single_method_explains():
    spec = importlib.util.spec_from_file_location("demo_seeds", REPO / "scripts" / "demo_seeds.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from mmgradcam.tasks import captioning

    captioner = captioning.load("default")
    results = script.check_seeds(captioner, range(2), ["gradcam", "layercam"])
    assert script.demo_default_seed() == 8
    for seed, (caption, by_method) in results.items():
        pixels, objects, _ = make_image(seed, seed=DEMO_SEED)
        for method, peaks in by_method.items():
            alone = captioner.explain(pixels, caption, method=method)
            assert peaks == shape_word_peaks(alone.words, alone.maps, objects)
        shape_nouns = set(SHAPES) | set(PLURALS.values())
        assert len(by_method["gradcam"]) == sum(w in shape_nouns for w in alone.words) > 0
