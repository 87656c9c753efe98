"""Small hand-built models whose maps can be computed by hand."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class LinearHead(nn.Module):
    """features (an Identity, so the activation is the input) -> y_k = sum_{c,i,j} V[k,c,i,j] A[c,i,j].

    The gradient at ``features`` for target k is exactly V[k], whatever the input.
    """

    def __init__(self, V: torch.Tensor):
        super().__init__()
        self.features = nn.Identity()
        self.V = nn.Parameter(V.clone())

    def forward(self, x):
        a = self.features(x)
        return torch.einsum("bcij,kcij->bk", a, self.V)


class GapLinear(nn.Module):
    """conv -> relu -> features -> global average pool -> linear: the CAM setting."""

    def __init__(self, channels: int = 6, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.features = nn.Identity()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        a = self.features(self.relu(self.conv(x)))
        return self.fc(a.mean(dim=(2, 3)))


class TokenHead(nn.Module):
    """The same computation as GapLinear, with the feature map carried as tokens.

    ``layout`` is "tokens" ((B, prefix + h*w, C), a CLS-like prefix prepended) or "bhwc".
    """

    def __init__(self, base: GapLinear, layout: str, prefix: int = 1):
        super().__init__()
        self.base = base
        self.layout = layout
        self.prefix = prefix
        self.features = nn.Identity()

    def forward(self, x):
        a = self.base.relu(self.base.conv(x))  # (B, C, h, w)
        b, c, h, w = a.shape
        if self.layout == "tokens":
            tokens = a.flatten(2).transpose(1, 2)
            prefix = a.mean(dim=(2, 3))[:, None, :].expand(b, self.prefix, c)
            t = self.features(torch.cat([prefix, tokens], dim=1))
            spatial = t[:, self.prefix:].transpose(1, 2).reshape(b, c, h, w)
        else:
            t = self.features(a.permute(0, 2, 3, 1))
            spatial = t.permute(0, 3, 1, 2)
        return self.base.fc(spatial.mean(dim=(2, 3)))


class ReluMLP(nn.Module):
    """Three linear layers on the flattened image; ReLUs as a module, functional and Tensor method."""

    def __init__(self, in_features: int, hidden: int = 8, classes: int = 3, relu_kind: str = "mixed"):
        super().__init__()
        self.l1 = nn.Linear(in_features, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, classes)
        self.relu = nn.ReLU(inplace=True)
        self.relu_kind = relu_kind

    def forward(self, x):
        z1 = self.l1(x.flatten(1))
        h1 = self.relu(z1)  # nn.ReLU module (inplace)
        z2 = self.l2(h1)
        h2 = F.relu(z2) if self.relu_kind == "mixed" else torch.relu(z2)
        z3 = self.l3(h2)
        return z3.relu() + z3  # Tensor.relu; keeps negative logits distinct


class TupleOutputLayer(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return (y, y.detach() * 0)
