"""tasks/ as registered plug-ins: imports that never circle (also inside functions and through
importlib) and never point up a floor anywhere in mmgradcam/ and tasks/ (engine and methods <-
tasks and data <- eval <- report <- cli; the engine imports no method), shared modules that name no family, a registry that a new family joins with one file,
and the traps of issue 13 (shared layer options, ignored max_words, unknown-word questions)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmgradcam.tasks import captioning, common, vqa
from mmgradcam.tasks.hf import HFAdapter, first_words, word_spans
from mmgradcam.tasks.text import is_word

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"common", "captioning", "vqa", "hf", "chat_vlm"}
IMAGE = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8"))


# ----------------------------------------------------------------------------- the import graph
def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "mmgradcam").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "tasks").rglob("*.py")):
        parts = ["mmgradcam", "tasks", *path.relative_to(ROOT / "tasks").with_suffix("").parts]
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


FILES = _module_files()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports: top-level or inside functions, and importlib.import_module
    with a literal name (relative ones resolved against a literal package or this package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def absolute(module: str, level: int, anchor: str = package) -> str:
        if not level:
            return module
        base = anchor.split(".")
        return ".".join(base[:len(base) - (level - 1)] + ([module] if module else []))

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            origin = absolute(node.module or "", node.level)
            for alias in node.names:  # "from . import blip" imports the module mmgradcam.tasks.blip
                found.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in FILES else origin)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if args:
                target = args[0].lstrip(".")
                found.add(absolute(target, len(args[0]) - len(target), args[1] if len(args) > 1 else package))
    return {m for m in found if m in FILES and m != name}


GRAPH = {name: _imports(name, path) for name, path in FILES.items()}
TASKS = {name for name in FILES if name.startswith("mmgradcam.tasks.")}


def _cycles(nodes: set[str]) -> list[list[str]]:
    """The import circles among ``nodes`` (one path per circle found by depth-first search)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(GRAPH[node] & nodes):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(nodes):
        if node not in state:
            visit(node, [node])
    return found


def test_the_scanner_sees_imports_inside_functions_and_through_importlib(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from . import hf\n    import importlib\n"
                      "    importlib.import_module('mmgradcam.tasks.blip')\n    importlib.import_module('.vilt', "
                      "'mmgradcam.tasks')\n")
    assert _imports("mmgradcam.tasks.probe", source) >= {"mmgradcam.tasks.hf", "mmgradcam.tasks.blip",
                                                          "mmgradcam.tasks.vilt"}


def test_no_import_circle_among_tasks_modules():
    assert _cycles(TASKS) == []


def test_tasks_load_no_module_by_name():
    """importlib with a computed name hides an edge from any scan: the registry replaces it."""
    calls = [name for name in TASKS for node in ast.walk(ast.parse(FILES[name].read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
             ("import_module", "__import__")]
    assert calls == []


def test_tasks_import_only_their_floor_and_below():
    above = ("mmgradcam.eval", "mmgradcam.report", "mmgradcam.cli")
    up = {(name, m) for name in TASKS for m in GRAPH[name] if m.startswith(above)}
    assert up == set()


def _families() -> set[str]:
    """Modules that register a loader or an adapter class, other than the shared ones."""
    registering = set()
    for name in TASKS:
        tree = ast.parse(FILES[name].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("register_loader", "register_adapter"):
                registering.add(name.rpartition(".")[2])
    return registering - SHARED


def test_shared_modules_name_no_family():
    families = _families()
    assert {"default", "blip", "git", "vit_gpt2", "vilt", "llava", "paligemma", "gemma3", "blip2",
            "qwen2_vl", "idefics3"} <= families
    for shared in SHARED:
        name = f"mmgradcam.tasks.{shared}"
        assert not {m.rpartition(".")[2] for m in GRAPH[name]} & families, shared
        # nor by a string (a hidden importlib or lookup table); docstrings may give examples
        tree = ast.parse(FILES[name].read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        literals = {n.value.lower() for n in ast.walk(tree)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}
        assert not literals & (families - {"default"}), shared  # "default" is also the shipped model's name
        assert not {f".{f}" for f in families} & literals and not {f"mmgradcam.tasks.{f}" for f in families} & literals


# ----------------------------------------------------------------------------- the registry
def test_every_family_registered_itself():
    handled = {(r.task, r.model_type, r.model_class, r.family) for r in common._ADAPTERS}
    assert handled >= {("captioning", "blip", "BlipForConditionalGeneration", "blip"),
                       ("captioning", "git", "GitForCausalLM", "git"),
                       ("captioning", "vision-encoder-decoder", "VisionEncoderDecoderModel", "vit_gpt2"),
                       ("vqa", "blip", "BlipForQuestionAnswering", "blip"),
                       ("vqa", "vilt", "ViltForQuestionAnswering", "vilt"),
                       ("captioning", "llava", "LlavaForConditionalGeneration", "llava"),
                       ("vqa", "llava", "LlavaForConditionalGeneration", "llava"),
                       ("captioning", "paligemma", "PaliGemmaForConditionalGeneration", "paligemma"),
                       ("vqa", "paligemma", "PaliGemmaForConditionalGeneration", "paligemma"),
                       ("captioning", "gemma3", "Gemma3ForConditionalGeneration", "gemma3"),
                       ("vqa", "gemma3", "Gemma3ForConditionalGeneration", "gemma3"),
                       ("captioning", "blip-2", "Blip2ForConditionalGeneration", "blip2"),
                       ("vqa", "blip-2", "Blip2ForConditionalGeneration", "blip2"),
                       ("captioning", "instructblip", "InstructBlipForConditionalGeneration", "instructblip"),
                       ("vqa", "instructblip", "InstructBlipForConditionalGeneration", "instructblip"),
                       ("captioning", "qwen2_vl", "Qwen2VLForConditionalGeneration", "qwen2-vl"),
                       ("vqa", "qwen2_vl", "Qwen2VLForConditionalGeneration", "qwen2-vl"),
                       ("captioning", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2.5-vl"),
                       ("vqa", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2.5-vl"),
                       ("captioning", "idefics3", "Idefics3ForConditionalGeneration", "idefics3"),
                       ("vqa", "idefics3", "Idefics3ForConditionalGeneration", "idefics3"),
                       ("captioning", "smolvlm", "SmolVLMForConditionalGeneration", "smolvlm"),
                       ("vqa", "smolvlm", "SmolVLMForConditionalGeneration", "smolvlm")}
    assert [name for _, name, _ in common._LOADERS][-1] == "transformers"  # the catch-all comes last
    assert "default" in [name for _, name, _ in common._LOADERS]


@pytest.fixture
def registry():
    loaders, adapters = list(common._LOADERS), list(common._ADAPTERS)
    yield
    common._LOADERS[:], common._ADAPTERS[:] = loaders, adapters


def test_a_new_family_is_one_registration(registry):
    class ToyCaptioner(captioning.Captioner):
        family = "toy"

    @common.register_loader("toy")
    def load_toy(request: common.LoadRequest):
        return ToyCaptioner() if request.source == "toy" and request.task == "captioning" else None

    assert captioning.load("toy").family == "toy"
    names = [name for _, name, _ in common._LOADERS]
    assert names.index("toy") < names.index("transformers")  # tried before the catch-all
    with pytest.raises(ValueError, match="no vqa adapter for Linear; supported: .*BlipForQuestionAnswering"):
        vqa.load(__import__("torch").nn.Linear(2, 2))  # the toy loader declined; the catch-all says why


# ----------------------------------------------------------------------------- traps
def test_layer_options_are_never_shared_between_adapters():
    from hf_tiny import tiny_vilt

    assert common.Adapter.layer_options == {}
    with pytest.raises(TypeError):
        common.Adapter.layer_options["layout"] = None  # read-only: an adapter assigns its own
    model, tokenizer, image_processor = tiny_vilt()
    vilt = vqa.load(model, tokenizer=tokenizer, image_processor=image_processor)
    assert "layout" in vilt.layer_options
    assert common.Adapter.layer_options == {} and captioning.Captioner.layer_options == {}


def test_hf_generate_honors_max_words():
    from hf_tiny import tiny_blip

    model, tokenizer, image_processor = tiny_blip()
    captioner = captioning.load(model, tokenizer=tokenizer, image_processor=image_processor)
    words = lambda text: [w for w, _, _ in word_spans(text) if is_word(w)]  # noqa: E731
    full = captioner.generate(IMAGE)
    assert len(words(full)) > 2  # otherwise the check below proves nothing
    short = captioner.generate(IMAGE, max_words=2)
    assert words(short) == words(full)[:2] and full.startswith(short)
    assert captioner.generate_batch([IMAGE, IMAGE], max_words=1) == [first_words(full, 1)] * 2
    with pytest.raises(ValueError, match="max_words"):
        captioner.generate(IMAGE, max_words=0)


def test_default_generate_honors_max_words(tmp_path):
    from tiny import tiny_captioner

    captioner = captioning.load(str(tiny_captioner(tmp_path / "cap")))
    assert len(captioner.generate(IMAGE, max_words=2).split()) <= 2
    assert captioner.generate_batch([IMAGE], max_words=2) == [captioner.generate(IMAGE, max_words=2)]


@pytest.fixture(scope="module")
def hf_vqa():
    from hf_tiny import tiny_blip, tiny_vilt

    return {name: vqa.load(model, tokenizer=tokenizer, image_processor=image_processor)
            for name, (model, tokenizer, image_processor) in
            {"vilt": tiny_vilt(), "blip": tiny_blip(vqa=True)}.items()}


@pytest.mark.parametrize("family", ["vilt", "blip"])
def test_a_question_of_only_unknown_words_is_refused(hf_vqa, family):
    adapter = hf_vqa[family]
    assert type(adapter).encode_question is HFAdapter.encode_question  # one shared check
    # "zebra" and "giraffe" are not in the tiny WordPiece vocabulary: both become [UNK]
    with pytest.raises(ValueError, match="only words the model's tokenizer does not know"):
        adapter.explain(IMAGE, "zebra giraffe", answer="red")
    with pytest.raises(ValueError, match="is empty"):
        adapter.explain(IMAGE, "?!", answer="red")
    # one known word is enough
    assert adapter.explain(IMAGE, "zebra color ?", answer="red").map.shape == (40, 60)


def test_classifier_vqa_is_shared_by_the_default_model_and_vilt(hf_vqa):
    default = vqa.load("default")
    for adapter in (default, hf_vqa["vilt"]):
        assert isinstance(adapter, vqa.ClassifierVQA)
        with pytest.raises(ValueError, match="'maybe' is not in the model's answer vocabulary"):
            adapter.answer_target("maybe")
    vilt = hf_vqa["vilt"]
    inputs, _ = vilt.prepare(IMAGE, "what color is the circle ?")
    ranked = vilt.ranked_answers(inputs, 3)
    assert vilt.answer_probabilities(inputs, [a for a, _ in ranked]) == pytest.approx([p for _, p in ranked])


# ------------------------------------------------------------- the floors of the whole tree
# engine and methods <- tasks and data <- eval <- report <- cli (docs/ARCHITECTURE.md); the root
# package (mg.explain, mg.guided_gradcam, ...) is the engine floor's public face
FLOORS = [("mmgradcam.engine", 0), ("mmgradcam.methods", 0), ("mmgradcam.targets", 0),
          ("mmgradcam.tasks", 1), ("mmgradcam.data", 1), ("mmgradcam.eval", 2), ("mmgradcam.report", 3),
          ("mmgradcam.cli", 4)]


def _floor(name: str) -> int:
    if name == "mmgradcam":
        return 0
    for prefix, floor in FLOORS:
        if name == prefix or name.startswith(prefix + "."):
            return floor
    raise AssertionError(f"{name} is on no floor: add its package to FLOORS and docs/ARCHITECTURE.md")


def test_every_module_is_on_a_floor():
    for name in FILES:
        _floor(name)


def test_no_import_circle_anywhere():
    assert _cycles(set(FILES)) == []


def test_no_import_up_a_floor_anywhere():
    up = sorted((name, m) for name in FILES for m in GRAPH[name] if _floor(m) > _floor(name))
    assert up == []


def test_engine_imports_no_method_and_nothing_above():
    """The engine looks methods up in its own registry (engine/registry.py): every method imports
    the engine, so an engine import of methods/ (or of the root package, which imports them) circles."""
    engine = {name for name in FILES if name.startswith("mmgradcam.engine")}
    bad = sorted((name, m) for name in engine for m in GRAPH[name]
                 if m == "mmgradcam" or m.startswith(("mmgradcam.methods", "mmgradcam.tasks", "mmgradcam.eval",
                                                     "mmgradcam.report", "mmgradcam.cli")))
    assert bad == []
    methods = {name for name in FILES if name.startswith("mmgradcam.methods")}
    above = ("mmgradcam.tasks", "mmgradcam.eval", "mmgradcam.report", "mmgradcam.cli")
    assert sorted((name, m) for name in methods for m in GRAPH[name] if m.startswith(above)) == []


def test_the_floor_scan_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import importlib\n    importlib.import_module('mmgradcam.eval.metrics')\n"
                     "    from ..methods import gradcam\n")
    found = _imports("mmgradcam.engine.probe", probe)
    assert {"mmgradcam.eval.metrics", "mmgradcam.methods.gradcam"} <= found
    assert any(_floor(m) > _floor("mmgradcam.engine.probe") for m in found)


# ----------------------------------------------------------------- docs/ARCHITECTURE.md
def test_architecture_doc_is_linked_and_its_method_example_runs(monkeypatch):
    """The README links the one architecture document; its "add a method" example is one file's
    text that, registered, is a method every caller can name."""
    import re

    import torch

    import mmgradcam as mg
    from mmgradcam.engine import registry
    from mmgradcam.targets import ClassScore

    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert "(docs/ARCHITECTURE.md)" in (ROOT / "README.md").read_text()
    assert not list((ROOT / "docs").glob("ARCHITECTURE_*.md"))  # merged into the one document
    for floor in ("engine", "methods", "tasks", "eval", "report", "cli"):
        assert floor in doc
    section = doc[doc.index("## How to add a method"):]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the example leaves no trace
    before = set(registry.available_methods())
    exec(source.replace("from ..engine.registry", "from mmgradcam.engine.registry"), {"__name__": "doc_example"})
    (name,) = set(registry.available_methods()) - before
    assert name in mg.available_methods()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x = torch.rand(1, 3, 6, 6)
    model(x)
    exp = mg.explain(model, x, [ClassScore(0)], "1", name)
    assert exp.method == name and exp.channel_weights is not None
