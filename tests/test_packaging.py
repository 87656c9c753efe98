"""The package installs as designed: tasks/ as mmgradcam.tasks, the console script, CI = README."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmgradcam
import mmgradcam.tasks

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_tasks_imports_as_mmgradcam_tasks_in_this_install():
    assert Path(mmgradcam.tasks.__file__).parent.name == "tasks"
    assert "mmgradcam" in sys.modules and mmgradcam.tasks.__name__ == "mmgradcam.tasks"


def test_every_package_directory_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mmgradcam").rglob("__init__.py")}
    found |= {"mmgradcam." + ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tasks").rglob("__init__.py")}
    assert found == listed


def test_normal_install_puts_tasks_under_mmgradcam(tmp_path):
    """A regular (non-editable) install of a copy of the sources, into a target directory."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, source / name)
    for name in ["mmgradcam", "tasks"]:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)]
    try:
        import setuptools  # noqa: F401

        pip.insert(4, "--no-build-isolation")  # no index needed when setuptools is here
    except ImportError:
        pass
    subprocess.run(pip, check=True, cwd=tmp_path)
    assert (target / "mmgradcam" / "tasks" / "__init__.py").is_file()
    for model in ["captioner", "vqa"]:  # the shipped default models travel with the package
        for name in ["model.safetensors", "config.json"]:
            assert (target / "mmgradcam" / "tasks" / "weights" / model / name).is_file()
    assert not (target / "tasks").exists()  # no stray top-level package
    code = "import mmgradcam.tasks, sys; print(mmgradcam.tasks.__file__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout
    assert Path(out.strip()) == target / "mmgradcam" / "tasks" / "__init__.py"


def test_console_script_help():
    script = Path(sys.executable).parent / "mmgradcam"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mmgradcam.cli"]
    result = subprocess.run(command + ["--help"], capture_output=True, text=True, check=True)
    assert "usage: mmgradcam" in result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    head = readme.split("\n## ")[0]
    commands = re.findall(r"```bash\n(.*?)```", head, re.S)[0].strip().splitlines()
    setup = [line for line in commands if not line.startswith("#")]
    assert len(setup) == 2, "README starts with exactly two set-up commands"
    test_command = setup[1]
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
