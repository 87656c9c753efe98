"""Occlusion sensitivity (Zeiler & Fergus): how much each target drops when a patch is covered."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..engine.gradients import Target, check_targets, target_scores
from ..engine.inputs import Inputs, call_model, image_of, slice_batch, with_image
from ..engine.state import preserved_state


def _positions(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - patch, 0) + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)  # the last patch reaches the border
    return starts


def occlusion(model: nn.Module, inputs: Inputs, targets: Sequence[Target], *, patch: int | tuple[int, int] = 16,
              stride: int | tuple[int, int] | None = None, baseline: float | torch.Tensor = 0.0,
              positions_per_forward: int = 16, image_key: str | None = None, eval_mode: bool = True,
              ) -> torch.Tensor:
    """(T, B, H, W): score(original) - score(occluded), averaged over the patches covering a pixel.

    Each forward pass carries ``positions_per_forward`` occluded copies of the whole batch;
    every target sees the output rows of one copy at a time, so per-sample targets stay aligned.
    """
    targets = check_targets(targets)
    image = image_of(inputs, image_key).detach()
    batch, _, height, width = image.shape
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    stride = stride or (max(ph // 2, 1), max(pw // 2, 1))
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if ph < 1 or pw < 1 or sh < 1 or sw < 1 or ph > height or pw > width:
        raise ValueError(f"patch {ph}x{pw} / stride {sh}x{sw} must be positive and fit the {height}x{width} image")
    if positions_per_forward < 1:
        raise ValueError("positions_per_forward must be at least 1")
    corners = [(y, x) for y in _positions(height, ph, sh) for x in _positions(width, pw, sw)]
    drop = torch.zeros(len(targets), batch, height, width)
    cover = torch.zeros(height, width)
    with preserved_state(model, eval_mode), torch.no_grad():
        reference = target_scores(targets, call_model(model, inputs), batch).float().cpu()
        for start in range(0, len(corners), positions_per_forward):
            chunk = corners[start:start + positions_per_forward]
            copies = image.repeat(len(chunk), 1, 1, 1)
            for k, (y, x) in enumerate(chunk):
                copies[k * batch:(k + 1) * batch, :, y:y + ph, x:x + pw] = baseline
            rows = torch.arange(batch).repeat(len(chunk))
            output = call_model(model, with_image(inputs, copies, image_key, repeat_rows=rows))
            for k, (y, x) in enumerate(chunk):
                scores = target_scores(targets, slice_batch(output, k * batch, (k + 1) * batch, len(chunk) * batch),
                                       batch).float().cpu()
                drop[:, :, y:y + ph, x:x + pw] += (reference - scores)[:, :, None, None]
                cover[y:y + ph, x:x + pw] += 1
    return drop / cover.clamp(min=1)
