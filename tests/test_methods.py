"""Each CAM method's map against a hand computation on a model whose gradients are known."""
import numpy as np
import pytest
import torch

import mmgradcam as mg
from mmgradcam.targets import ClassScore
from models import GapLinear, LinearHead

C, H, W, K = 3, 4, 5, 2


def hand_maps(A: np.ndarray, G: np.ndarray, method: str) -> np.ndarray:
    """Textbook formulas written with explicit loops; A (C, h, w), G (C, h, w)."""
    out = np.zeros(A.shape[1:])
    for c in range(A.shape[0]):
        if method == "gradcam":
            weight = G[c].mean()
        elif method == "xgradcam":
            weight = (G[c] * A[c]).sum() / (A[c].sum() + 1e-7)
        elif method == "gradcam++":
            alpha = np.zeros_like(G[c])
            for i in range(A.shape[1]):
                for j in range(A.shape[2]):
                    g = G[c, i, j]
                    if g != 0:
                        alpha[i, j] = g**2 / (2 * g**2 + A[c].sum() * g**3 + 1e-7)
            weight = (alpha * np.maximum(G[c], 0)).sum()
        elif method == "hirescam":
            weight = G[c]
        elif method == "layercam":
            weight = np.maximum(G[c], 0)
        out += weight * A[c]
    return np.maximum(out, 0)


@pytest.fixture
def linear_head():
    V = torch.randn(K, C, H, W)
    return LinearHead(V), V


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"])
def test_each_method_matches_its_formula(linear_head, method):
    model, V = linear_head
    x = torch.rand(2, C, H, W) + 0.1
    exp = mg.explain(model, x, [ClassScore(0), ClassScore(1)], "features", method)
    assert exp.layer_maps.shape == (2, 2, H, W)
    for t in range(K):
        for b in range(2):
            expected = hand_maps(x[b].double().numpy(), V[t].double().numpy(), method)
            np.testing.assert_allclose(exp.layer_maps[t, b].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_methods_differ_where_gradients_vary(linear_head):
    model, _ = linear_head
    x = torch.rand(1, C, H, W) + 0.1
    maps = {m: mg.explain(model, x, [ClassScore(0)], "features", m).layer_maps for m in mg.available_methods()}
    assert not torch.allclose(maps["gradcam"], maps["hirescam"])
    assert not torch.allclose(maps["hirescam"], maps["layercam"])


def test_gradients_are_the_known_ones(linear_head):
    model, V = linear_head
    x = torch.rand(3, C, H, W)
    exp = mg.explain(model, x, [ClassScore(1), ClassScore(0)], "features")
    torch.testing.assert_close(exp.gradients[0], V[1].expand(3, C, H, W))
    torch.testing.assert_close(exp.gradients[1], V[0].expand(3, C, H, W))
    torch.testing.assert_close(exp.scores, model(x).T[[1, 0]].detach())


def test_signed_map_and_counterfactual(linear_head):
    model, V = linear_head
    x = torch.rand(1, C, H, W) + 0.1
    exp = mg.explain(model, x, [ClassScore(0)], "features")
    signed = (V[0].mean(dim=(1, 2))[:, None, None] * x[0]).sum(0)
    torch.testing.assert_close(exp.signed_layer_maps[0, 0], signed)
    torch.testing.assert_close(exp.layer_maps[0, 0], signed.clamp(min=0))
    cf = mg.counterfactual(model, x, [ClassScore(0)], "features")
    # Negated gradients: the counterfactual map is the negative part of the signed map.
    torch.testing.assert_close(cf.layer_maps[0, 0], (-signed).clamp(min=0))
    assert cf.counterfactual and torch.equal(cf.gradients, -exp.gradients)


def test_gradcam_finds_the_bright_square():
    """A conv net that responds to brightness: the map peaks where the bright square is."""
    model = GapLinear(channels=1, classes=1)
    with torch.no_grad():
        model.conv.weight.fill_(1.0 / 27)
        model.conv.bias.zero_()
        model.fc.weight.fill_(1.0)
    x = torch.zeros(1, 3, 16, 16)
    x[:, :, 10:14, 2:6] = 1.0
    exp = mg.explain(model, x, [ClassScore(0)], "features")
    peak = np.unravel_index(exp.maps[0, 0].argmax().item(), (16, 16))
    assert 10 <= peak[0] < 14 and 2 <= peak[1] < 6
    assert exp.layer_maps[0, 0, :5, :].sum() == 0  # nothing lit far above the square


def test_cam_identity_on_gap_linear_head():
    """Grad-CAM equals CAM / (h*w) on a GAP + linear head (the Grad-CAM paper's derivation)."""
    model = GapLinear(channels=6, classes=4)
    x = torch.randn(3, 3, 8, 10)
    classes = [0, 2, [1, 3, 0]]
    targets = [ClassScore(c) for c in classes]
    grad = mg.explain(model, x, targets, "features")
    cam = mg.cam(model, x, "features", model.fc, classes)
    torch.testing.assert_close(grad.signed_layer_maps * (8 * 10), cam.signed_layer_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cam.scores, grad.scores)
    assert cam.gradients is None and cam.method == "cam"


def test_method_names_and_unknown_method(linear_head):
    model, _ = linear_head
    x = torch.rand(1, C, H, W)
    a = mg.explain(model, x, [ClassScore(0)], "features", "Grad-CAM++").layer_maps
    b = mg.explain(model, x, [ClassScore(0)], "features", "gradcam_pp").layer_maps
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown method 'scorecam'.*gradcam"):
        mg.explain(model, x, [ClassScore(0)], "features", "scorecam")


def test_normalized_maps_and_all_zero_map():
    model = LinearHead(-torch.ones(1, C, H, W))  # every weight negative: Grad-CAM is all zero
    x = torch.rand(2, C, H, W) + 0.1
    exp = mg.explain(model, x, [ClassScore(0)], "features")
    assert torch.count_nonzero(exp.layer_maps) == 0
    norm = exp.normalized()
    assert torch.isfinite(norm).all() and torch.count_nonzero(norm) == 0
    model = LinearHead(torch.randn(1, C, H, W))
    norm = mg.explain(model, x, [ClassScore(0)], "features", "hirescam").normalized()
    for m in norm.reshape(-1, H * W):
        assert m.min().item() == 0.0 and abs(m.max().item() - 1.0) < 1e-6


def test_maps_are_bilinear_upsamples(linear_head):
    model, _ = linear_head
    x = torch.rand(2, C, H, W)
    exp = mg.explain(model, x, [ClassScore(0)], "features", input_size=(40, 50))
    assert exp.maps.shape == (1, 2, 40, 50)
    expected = torch.nn.functional.interpolate(exp.layer_maps, size=(40, 50), mode="bilinear", align_corners=False)
    torch.testing.assert_close(exp.maps, expected)
