"""The metric table is the one place a metric is declared: a toy metric registered as one entry
shows up in results.jsonl, summary.json, summary.md and the report's table columns, and nothing
else is edited. Also: eval imports neither report nor cli (anywhere, inside functions included)."""
import ast
import importlib
import json
import re
from pathlib import Path

import pytest

from mmgradcam.eval import metrics
from mmgradcam.eval.metrics import Metric, energy_inside, registered
from mmgradcam.eval.pipeline import Evaluation
from mmgradcam.eval.summary import summarize
from tiny import tiny_eval_config

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "mmgradcam" / "eval"
BUILT_IN = ("pointing_0px", "pointing_15px", "energy", "iou_15", "box_iou", "box_correct", "obj_iou", "func_iou")


def _mass_outside(scored) -> float:
    """The toy metric: the share of the map's mass outside the mask (1 - energy)."""
    return 1.0 - energy_inside(scored.heatmap, scored.mask)


TOY = Metric("toy_outside", "toy mass outside", _mass_outside)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny eval (4 shapes-world images, captions, references and VQA) and its report, with the
    toy metric registered for the run only."""
    root = tmp_path_factory.mktemp("metric_table")
    config = tiny_eval_config(root, 4, references=True)
    out = root / "run"
    from mmgradcam.report.build import build_report

    with registered(TOY):
        assert metrics.metric_keys() == BUILT_IN + ("toy_outside",)
        Evaluation(config, progress=False).run()
        html = build_report(out).read_text()
        plots = sorted(p.name for p in (out / "plots").iterdir())
    return {"out": out, "html": html, "plots": plots}


def test_the_table_is_restored_after_the_block(toy_run):
    assert metrics.metric_keys() == BUILT_IN and metrics.METRICS == BUILT_IN
    with pytest.raises(ValueError, match="already"):
        metrics.register(Metric("energy", "energy", _mass_outside))
    assert metrics.metric_keys() == BUILT_IN


def test_a_registered_metric_reaches_every_results_line(toy_run):
    lines = [json.loads(line) for line in (toy_run["out"] / "results.jsonl").read_text().splitlines()]
    assert {line["kind"] for line in lines} == {"word", "answer"}
    for line in lines:
        for who in ("model", "center", "random"):
            assert list(line[who]) == list(BUILT_IN) + ["toy_outside"]  # appended: the built-ins' order kept
            assert line[who]["toy_outside"] == pytest.approx(1.0 - line[who]["energy"], abs=1e-9) \
                or line[who]["energy"] == 0.0


def test_a_registered_metric_reaches_the_summary(toy_run):
    summary = json.loads((toy_run["out"] / "summary.json").read_text())
    for aggregates in (summary["captions"]["generated"], summary["captions"]["reference"], summary["vqa"],
                       summary["per_category"]["generated"]):
        for agg in aggregates.values():
            assert set(agg["toy_outside"]) == {"model", "center", "random"}
    table = summary["method_table"]
    assert table["metrics"] == ["pointing_0px", "pointing_15px", "energy", "iou_15", "obj_iou", "func_iou",
                                "toy_outside"]
    for classes in table["methods"].values():
        for cell in classes.values():
            assert len(cell["toy_outside"]) == 3
    for baselines in table["baselines"].values():
        assert "toy_outside" in baselines["center"] and "toy_outside" in baselines["random"]
    markdown = (toy_run["out"] / "summary.md").read_text()
    assert "| words | method | n | pointing_0px | pointing_15px | energy | iou_15 | obj_iou | func_iou | toy_outside |" \
        in markdown
    assert "| noun | " in markdown and re.search(r"\| noun \| \d+ \| toy_outside \|", markdown)


def test_a_registered_metric_reaches_the_report_columns(toy_run):
    html = toy_run["html"]
    methods = html[html.index("id='methods'"):]
    methods = methods[:methods.index("</thead>")]
    assert "<th>toy_outside</th>" in methods
    words = html[html.index("id='words'"):]
    header, body = words[:words.index("</thead>")], words[words.index("<tbody>"):words.index("</tbody>")]
    assert "<th>toy mass outside</th>" in header
    columns = header.count("<th>")
    rows = body.split("<tr>")[1:]
    assert rows and all(row.count("<td") == columns for row in rows)
    assert "distributions.png" in toy_run["plots"] and "methods.png" in toy_run["plots"]


def test_without_the_entry_the_summary_has_only_the_built_in_metrics(toy_run):
    lines = [json.loads(line) for line in (toy_run["out"] / "results.jsonl").read_text().splitlines()]
    summary = summarize(lines, [], images=4, incomplete_batches=0)
    assert "toy_outside" not in summary["captions"]["generated"]["noun"]
    assert "toy_outside" not in summary["method_table"]["metrics"]


# ----------------------------------------------------------------------------- floors
def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module a file imports: top level and inside functions, relative imports resolved,
    ``from X import Y`` also as X.Y (Y may be a module), and importlib.import_module("...") /
    __import__("...") with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def test_the_import_walker_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..report import eval_plots\n    import importlib\n"
                     "    importlib.import_module('mmgradcam.cli')\n")
    found = _imported_modules(probe, "mmgradcam.eval")
    assert "mmgradcam.report.eval_plots" in found and "mmgradcam.cli" in found


def test_eval_imports_neither_report_nor_cli():
    offending = []
    for path in sorted(EVAL.glob("*.py")):
        for module in _imported_modules(path, "mmgradcam.eval"):
            if module in ("mmgradcam.report", "mmgradcam.cli") or module.startswith(("mmgradcam.report.",
                                                                                   "mmgradcam.cli.")):
                offending.append(f"{path.name}: {module}")
    assert not offending, offending
    for path in sorted(EVAL.glob("*.py")):  # and every eval module still imports
        importlib.import_module(f"mmgradcam.eval.{path.stem}")


def test_eval_cites_only_documents_the_repository_has():
    """metrics.py used to send readers to a DESIGN.md the repository lacked."""
    for path in sorted(EVAL.glob("*.py")):
        for cited in re.findall(r"[\w/.-]*[A-Za-z_]\w*\.md\b", path.read_text()):
            if cited in ("summary.md",):  # a file an eval run writes, not a document
                continue
            candidates = [REPO / cited, REPO / "docs" / cited]
            assert any(c.is_file() for c in candidates), f"{path.name} cites {cited}, which the repository lacks"
