"""Model files: safetensors weights plus a JSON config (with vocabularies). No pickle is ever loaded."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"


def save_model(model: nn.Module, config: dict, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(config, indent=1))
    return directory


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {str(directory)!r}: expected a model directory with "
                                f"{CONFIG} and {WEIGHTS}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def load_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load ``model.safetensors`` into ``model``; a mismatch with the config's architecture is an error."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {str(directory)!r}")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a safetensors file ({error})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model its config describes: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
                  if expected[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"{path}: tensors with the wrong shape for the config: {mismatched[:3]}")
    model.load_state_dict(state)
    return model


def packaged(name: str) -> Path:
    """The directory of a model shipped inside the package (tasks/weights/<name>)."""
    return PACKAGE_WEIGHTS / name

