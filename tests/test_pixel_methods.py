"""Input-space methods against hand computations: gradient, Guided Backprop, Deconvolution,
Guided Grad-CAM and occlusion."""
import pytest
import torch
from torch import nn

import mmgradcam as mg
from mmgradcam.targets import ClassScore
from models import GapLinear, ReluMLP

SHAPE = (1, 3, 3)


def hand_backprop(model: ReluMLP, x: torch.Tensor, k: int, rule: str | None) -> torch.Tensor:
    """Backpropagate d y_k through the MLP by hand, applying ``rule`` at every ReLU."""
    def through_relu(grad, pre):
        if rule == "guided":
            return grad * (pre > 0) * (grad > 0)
        if rule == "deconv":
            return grad * (grad > 0)
        return grad * (pre > 0)

    with torch.no_grad():
        z1 = model.l1(x.flatten(1))
        z2 = model.l2(torch.relu(z1))
        z3 = model.l3(torch.relu(z2))
        onehot = torch.zeros_like(z3)
        onehot[:, k] = 1.0
        g = through_relu(onehot, z3) + onehot  # out = relu(z3) + z3
        g = through_relu(g @ model.l3.weight, z2)
        g = through_relu(g @ model.l2.weight, z1)
        return (g @ model.l1.weight).reshape(x.shape)


@pytest.mark.parametrize("relu_kind", ["mixed", "torch"])
@pytest.mark.parametrize("rule, function", [(None, mg.input_gradient), ("guided", mg.guided_backprop),
                                            ("deconv", mg.deconvolution)])
def test_relu_rules_match_hand_backprop(relu_kind, rule, function):
    model = ReluMLP(in_features=9, hidden=16, classes=3, relu_kind=relu_kind)
    x = torch.randn(4, *SHAPE)
    got = function(model, x, [ClassScore(0), ClassScore(2)])
    assert got.shape == (2, 4, *SHAPE)
    for t, k in enumerate([0, 2]):
        torch.testing.assert_close(got[t], hand_backprop(model, x, k, rule), rtol=1e-5, atol=1e-6)


def _gradients_at_relu_inputs(model: ReluMLP, function, x):
    """Run ``function`` and record d target / d z for the pre-activations z1, z2 feeding the ReLUs."""
    seen = {}

    def watch(name):
        def hook(module, args, output):
            output.register_hook(lambda g: seen.__setitem__(name, (g.clone(), output.detach().clone())))
        return hook

    handles = [model.l1.register_forward_hook(watch("z1")), model.l2.register_forward_hook(watch("z2"))]
    try:
        function(model, x.clone().requires_grad_(False), [ClassScore(1)], batched=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_guided_backprop_zeroes_negative_gradients_at_every_relu():
    model = ReluMLP(in_features=9, hidden=16, classes=3)
    x = torch.randn(4, *SHAPE)
    guided = _gradients_at_relu_inputs(model, mg.guided_backprop, x)
    plain = _gradients_at_relu_inputs(model, mg.input_gradient, x)
    assert set(guided) == {"z1", "z2"}
    for name, (grad, pre) in guided.items():
        assert (grad >= 0).all(), name  # no negative gradient passes a ReLU
        assert (grad[pre <= 0] == 0).all(), name  # nor any where the ReLU was off
        assert (grad > 0).any(), name
    # the plain gradient does carry negative values there, so the rule is what removed them
    assert any((grad < 0).any() for grad, _ in plain.values())


def test_guided_backprop_batched_equals_looped_and_needs_relus():
    model = ReluMLP(in_features=9)
    x = torch.randn(3, *SHAPE)
    targets = [ClassScore(0), ClassScore(1), ClassScore([2, 0, 1])]
    torch.testing.assert_close(mg.guided_backprop(model, x, targets, batched=True),
                               mg.guided_backprop(model, x, targets, batched=False), rtol=0, atol=1e-6)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(9, 2))
    with pytest.warns(UserWarning, match="no ReLU call"):
        mg.guided_backprop(linear, x, [ClassScore(0)])


def test_guided_gradcam_is_the_product():
    model = GapLinear()
    x = torch.randn(2, 3, 8, 8)
    targets = [ClassScore(0), ClassScore(3)]
    fused = mg.guided_gradcam(model, x, targets, "features")
    expected = mg.guided_backprop(model, x, targets) * mg.explain(model, x, targets, "features").maps[:, :, None]
    torch.testing.assert_close(fused, expected)


class WeightedSum(nn.Module):
    """y_k = sum_ij w_k[i, j] * x[i, j] (one channel): occluding a pixel drops y_k by w_k x."""

    def __init__(self, h, w, k):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, h, w))

    def forward(self, x):
        return torch.einsum("bhw,khw->bk", x[:, 0], self.w)


def test_occlusion_known_answer():
    model = WeightedSum(6, 7, 2)
    x = torch.randn(3, 1, 6, 7)
    drop = mg.occlusion(model, x, [ClassScore(0), ClassScore([1, 0, 1])], patch=1, stride=1,
                        positions_per_forward=5)
    w = model.w.detach()
    torch.testing.assert_close(drop[0], w[0] * x[:, 0])
    for b, k in enumerate([1, 0, 1]):
        torch.testing.assert_close(drop[1, b], w[k] * x[b, 0])


def test_occlusion_patches_average_over_cover():
    model = WeightedSum(8, 8, 1)
    x = torch.randn(1, 1, 8, 8)
    drop = mg.occlusion(model, x, [ClassScore(0)], patch=4, stride=2)
    contribution = (model.w.detach()[0] * x[0, 0])
    # pixel (0, 0) is covered only by the patch at (0, 0)
    torch.testing.assert_close(drop[0, 0, 0, 0], contribution[:4, :4].sum())
    # chunking the positions does not change the result
    again = mg.occlusion(model, x, [ClassScore(0)], patch=4, stride=2, positions_per_forward=1)
    torch.testing.assert_close(drop, again)
    with pytest.raises(ValueError, match="must be positive and fit"):
        mg.occlusion(model, x, [ClassScore(0)], patch=9)
