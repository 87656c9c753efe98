"""Small copies of scored maps for the reports (``maps/batchNNNNNN.npz``, one file per batch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIDE = 64  # longest side of a kept map: enough for a report overlay, small enough for 10k words


class Thumbnails:
    """Collects one batch's small maps; ``save`` writes them (before the batch's lines, so a
    resumed batch rewrites the same file) and starts the next batch."""

    def __init__(self) -> None:
        self.maps: dict[str, np.ndarray] = {}

    def keep(self, key: str, heatmap: np.ndarray) -> None:
        """Keep a small copy (longest side 64 px, float16) of a scored map."""
        import torch
        import torch.nn.functional as F

        h, w = heatmap.shape
        factor = min(1.0, SIDE / max(h, w))
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        small = F.interpolate(torch.from_numpy(np.asarray(heatmap, dtype=np.float32))[None, None], size=size,
                              mode="area")[0, 0].numpy()
        self.maps[key] = small.astype(np.float16)

    def save(self, out: Path, batch: int) -> None:
        if not self.maps:
            return
        directory = out / "maps"
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"batch{batch:06d}.tmp.npz"
        np.savez_compressed(tmp, **self.maps)
        tmp.replace(directory / f"batch{batch:06d}.npz")
        self.maps = {}
