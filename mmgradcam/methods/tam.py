"""TAM, token activation maps (Li et al., "Token Activation Map to Visually Explain Multimodal
LLMs", ICCV 2025), for models whose image tokens sit in the language model's sequence (GIT).

No gradients. The adapter reads, for every word, the logit of the word's token(s) through the LM
head at every image token's final hidden state (a word of several tokens sums its tokens'
logits): the raw map over the image-token grid. Two steps follow, our simple documented versions
of the paper's modules:

- estimated causal inference: earlier words' activations leak into later words' maps, so word t's
  map is its raw map minus its least-squares fit on a constant (the logits' offset) and the raw
  maps of words 0..t-1, clamped at 0: what word t lights up beyond what the earlier words (and a
  flat offset) explain. Word 0 is fitted on the constant only.
- rank Gaussian filter: the corrected map is rank-transformed (average ranks for ties, scaled to
  [0, 1], so the bottom cells, e.g. the clamped zeros, stay 0) and smoothed by a Gaussian of
  ``SIGMA`` grid cells (edges repeat the nearest cell): ranks tame the few extreme logits that
  dominate a raw map, the filter removes isolated noisy tokens. An all-zero map stays all zero.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import rankdata

from ..engine.registry import ReadoutMethod, register

SIGMA = 1.0  # the rank Gaussian filter's standard deviation, in image-token grid cells


def causal_correction(raw: torch.Tensor) -> torch.Tensor:
    """(n, h, w) raw maps in word order -> each minus its least-squares fit on a constant and the
    earlier words' raw maps, clamped at 0."""
    n = raw.shape[0]
    flat = raw.reshape(n, -1).double()
    out = torch.zeros_like(flat)
    for t in range(n):
        basis = torch.cat([torch.ones_like(flat[:1]), flat[:t]]).T  # (h*w, t + 1)
        fit = basis @ (torch.linalg.pinv(basis) @ flat[t])  # pinv: earlier maps may be collinear
        out[t] = (flat[t] - fit).clamp(min=0)
    return out.reshape(raw.shape).to(raw.dtype)


def rank_gaussian(maps: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """(n, h, w) non-negative maps -> rank-transformed to [0, 1] and Gaussian-filtered."""
    out = np.zeros(maps.shape, dtype=np.float64)
    for j, m in enumerate(maps.detach().cpu().double().numpy()):
        ranks = rankdata(m.reshape(-1), method="average")
        span = ranks.max() - ranks.min()
        if m.max() <= 0 or span == 0:
            continue  # nothing lights up: an all-zero map
        unit = ((ranks - ranks.min()) / span).reshape(m.shape)
        out[j] = ndimage.gaussian_filter(unit, sigma=sigma, mode="nearest")
    return torch.from_numpy(out).to(maps.dtype)


@register
class TAM(ReadoutMethod):
    """Token activation maps: LM-head logits at the image tokens, causal correction, rank Gaussian filter."""

    name = "tam"
    sigma = SIGMA

    def maps(self, raw: torch.Tensor) -> torch.Tensor:
        return rank_gaussian(causal_correction(raw.float()), self.sigma)
