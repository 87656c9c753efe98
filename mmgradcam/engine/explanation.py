"""The result of an explanation: maps at the layer's resolution and at the input's."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize (..., h, w) maps to (..., H, W)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    resized = F.interpolate(flat, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return resized.reshape(*lead, *resized.shape[-2:])


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each (h, w) map to [0, 1]; a constant map (all zero included) becomes all zero."""
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).float()
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    normalized = torch.where(span > 0, (flat - low) / safe_span, torch.zeros_like(flat))
    return normalized.reshape(maps.shape)


@dataclass
class Explanation:
    """Maps for T targets over a batch of B inputs at one layer.

    layer_maps        (T, B, h, w)  the method's map after its ReLU, unnormalized
    signed_layer_maps (T, B, h, w)  the same before the ReLU (raw signed Grad-CAM etc.)
    activations       (B, C, h, w)  the layer's activations, detached
    gradients         (T, B, C, h, w) d target / d activation (negated for counterfactual maps);
                      None for CAM, which uses classifier weights
    scores            (T, B)        each target's value, detached
    channel_weights   (T, B, C)     the method's own per-channel weights (Grad-CAM: the mean
                      gradient); None for methods that weigh each location (HiResCAM, LayerCAM)
    pixel_maps        (T, B, H, W)  a pixel-space method's map at the input's resolution (Guided
                      Grad-CAM); ``layer_maps`` / ``maps`` then hold the CAM map it refines
    """

    layer_maps: torch.Tensor
    signed_layer_maps: torch.Tensor
    activations: torch.Tensor
    gradients: torch.Tensor | None
    scores: torch.Tensor
    input_size: tuple[int, int] | None
    method: str
    layer_name: str
    counterfactual: bool = False
    channel_weights: torch.Tensor | None = None
    pixel_maps: torch.Tensor | None = None

    @property
    def maps(self) -> torch.Tensor:
        """(T, B, H, W): ``layer_maps`` upsampled bilinearly to the input image size."""
        if self.input_size is None:
            raise ValueError(
                "the input image size is unknown (no (B, C, H, W) image among the inputs); "
                "pass input_size=(H, W) to explain, or use upsample(size)"
            )
        return upsample_maps(self.layer_maps, self.input_size)

    def results_on(self, device: torch.device | str = "cpu") -> "Explanation":
        """A copy whose maps, scores and weights are float32 on ``device`` (the CPU: what task
        results hand back), without the layer's activations and gradients (task results do not
        carry them; moving them off a GPU would cost a copy per target)."""
        def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.detach().to(device=device, dtype=torch.float32)

        return replace(self, layer_maps=moved(self.layer_maps), signed_layer_maps=moved(self.signed_layer_maps),
                       activations=self.activations.new_empty(0, device=device), gradients=None,
                       scores=moved(self.scores), channel_weights=moved(self.channel_weights),
                       pixel_maps=moved(self.pixel_maps))

    def upsample(self, size: tuple[int, int]) -> torch.Tensor:
        return upsample_maps(self.layer_maps, size)

    def normalized(self) -> torch.Tensor:
        """``maps`` min-maxed per map to [0, 1]; an all-zero map stays all zero."""
        return normalize_maps(self.maps)
