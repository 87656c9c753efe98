"""The engine's contract: batching, layouts, layer capture, errors, and the caller's model left alone."""
import warnings

import pytest
import torch
from torch import nn

import mmgradcam as mg
from mmgradcam.engine.layouts import infer_token_grid
from mmgradcam.engine.state import snapshot
from mmgradcam.targets import ClassLogProb, ClassScore
from models import GapLinear, TokenHead, TupleOutputLayer


def many_targets(batch):
    return [ClassScore(0), ClassScore(3), ClassLogProb(1), ClassLogProb(list(range(batch))),
            lambda out: out.softmax(-1)[:, 2] * out[:, 0]]


@pytest.mark.parametrize("method", mg.available_methods())
def test_batched_equals_looped(method):
    model = GapLinear(channels=8, classes=4)
    x = torch.randn(4, 3, 12, 12)
    targets = many_targets(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the batched path must really run, not fall back
        batched = mg.explain(model, x, targets, "features", method, batched=True)
    looped = mg.explain(model, x, targets, "features", method, batched=False)
    torch.testing.assert_close(batched.gradients, looped.gradients, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched.layer_maps, looped.layer_maps, rtol=0, atol=1e-6)


def test_batched_equals_one_sample_at_a_time():
    model = GapLinear(channels=8, classes=4)
    x = torch.randn(3, 3, 12, 12)
    whole = mg.explain(model, x, [ClassScore(1), ClassScore([0, 2, 3])], "features")
    for b, index in enumerate([0, 2, 3]):
        single = mg.explain(model, x[b:b + 1], [ClassScore(1), ClassScore(index)], "features")
        torch.testing.assert_close(whole.layer_maps[:, b], single.layer_maps[:, 0], rtol=0, atol=1e-6)


def test_auto_falls_back_to_loop_when_batching_fails():
    class NoVmap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            if grad.abs().sum().item() < 0:  # .item() has no batching rule under vmap
                return grad
            return grad * 2

    class Model(GapLinear):
        def forward(self, x):
            a = self.features(self.relu(self.conv(x)))
            return self.fc(NoVmap.apply(a).mean(dim=(2, 3)))

    model = Model()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError):
        mg.explain(model, x, [ClassScore(0), ClassScore(1)], "features", batched=True)
    with pytest.warns(UserWarning, match="falling back to one backward per target"):
        auto = mg.explain(model, x, [ClassScore(0), ClassScore(1)], "features")
    looped = mg.explain(model, x, [ClassScore(0), ClassScore(1)], "features", batched=False)
    torch.testing.assert_close(auto.layer_maps, looped.layer_maps)


@pytest.mark.parametrize("layout, prefix", [("tokens", 1), ("tokens", 5), ("bhwc", 0)])
def test_token_and_channels_last_layouts_equal_bchw(layout, prefix):
    base = GapLinear(channels=5, classes=3)
    x = torch.randn(2, 3, 6, 6)
    reference = mg.explain(base, x, [ClassScore(0), ClassScore(2)], "features", "hirescam")
    model = TokenHead(base, layout, prefix)
    torch.testing.assert_close(model(x), base(x))
    kwargs = {"layout": "bhwc"} if layout == "bhwc" else {}
    other = mg.explain(model, x, [ClassScore(0), ClassScore(2)], "features", "hirescam", **kwargs)
    torch.testing.assert_close(other.layer_maps, reference.layer_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other.activations, reference.activations)


def test_non_square_token_grid_needs_and_uses_grid():
    base = GapLinear(channels=4, classes=2)
    x = torch.randn(1, 3, 4, 6)
    model = TokenHead(base, "tokens", prefix=1)
    with pytest.raises(ValueError, match="grid=\\(h, w\\)"):
        mg.explain(model, x, [ClassScore(0)], "features", prefix_tokens=1)
    exp = mg.explain(model, x, [ClassScore(0)], "features", grid=(4, 6))
    reference = mg.explain(base, x, [ClassScore(0)], "features")
    torch.testing.assert_close(exp.layer_maps, reference.layer_maps)


def test_infer_token_grid():
    assert infer_token_grid(197) == (1, (14, 14))
    assert infer_token_grid(256 + 5) == (5, (16, 16))
    assert infer_token_grid(49) == (0, (7, 7))
    assert infer_token_grid(26, grid=(5, 5)) == (1, (5, 5))
    with pytest.raises(ValueError):
        infer_token_grid(10, grid=(3, 4))


def test_several_layers_in_one_pass_equal_single_layers():
    model = GapLinear()
    x = torch.randn(2, 3, 8, 8)
    targets = [ClassScore(0), ClassScore(1)]
    both = mg.explain(model, x, targets, ["conv", model.features])
    assert [e.layer_name for e in both] == ["conv", "features"]
    for exp, name in zip(both, ["conv", "features"]):
        torch.testing.assert_close(exp.layer_maps, mg.explain(model, x, targets, name).layer_maps)


def test_tuple_and_model_output_layer_outputs():
    from transformers.modeling_outputs import BaseModelOutput

    class WrapOutput(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return BaseModelOutput(last_hidden_state=self.inner(x))

    base = GapLinear()
    x = torch.randn(2, 3, 8, 8)
    reference = mg.explain(base, x, [ClassScore(1)], "features").layer_maps
    for wrapper, reader in [(TupleOutputLayer, lambda o: o[0]), (WrapOutput, lambda o: o.last_hidden_state)]:
        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.base = base
                self.block = wrapper(nn.Sequential(base.conv, base.relu))

            def forward(self, x):
                return self.base.fc(reader(self.block(x)).mean(dim=(2, 3)))

        exp = mg.explain(Model(), x, [ClassScore(1)], "block")
        torch.testing.assert_close(exp.layer_maps, reference)


def test_inplace_ops_after_the_layer_do_not_change_the_capture():
    class Model(GapLinear):
        def forward(self, x):
            a = self.features(self.conv(x))
            a += 1.0  # in place, right after the captured layer (like ResNet's `out += identity`)
            return self.fc(torch.relu_(a).mean(dim=(2, 3)))

    model = Model()
    x = torch.randn(1, 3, 6, 6)
    exp = mg.explain(model, x, [ClassScore(0)], "features")
    torch.testing.assert_close(exp.activations, model.conv(x).detach())


def test_frozen_parameters_and_no_grad_callers():
    model = GapLinear()
    x = torch.randn(2, 3, 8, 8)
    reference = mg.explain(model, x, [ClassScore(0), ClassScore(2)], "features").layer_maps
    model.requires_grad_(False)
    frozen = mg.explain(model, x, [ClassScore(0), ClassScore(2)], "features").layer_maps
    torch.testing.assert_close(frozen, reference)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        under_no_grad = mg.explain(model, x, [ClassScore(0), ClassScore(2)], "features").layer_maps
        gb = mg.guided_backprop(model, x, [ClassScore(0)])
    torch.testing.assert_close(under_no_grad, reference)
    assert gb.abs().sum() > 0


def test_no_backward_below_the_layer_and_no_grad_side_effects():
    model = GapLinear()
    calls = []
    model.conv.weight.register_hook(lambda g: calls.append("conv weight"))
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    mg.explain(model, x, [ClassScore(0), ClassScore(1)], "features")
    assert calls == [] and x.grad is None
    assert all(p.grad is None for p in model.parameters())


def _mixed_state_model():
    model = GapLinear()
    model.train()
    model.relu.eval()  # modes differ per submodule
    model.conv.bias.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)
    handle = model.conv.register_forward_hook(lambda m, i, o: None)
    return model, handle


def _state_signature(model):
    state = snapshot(model)
    return (
        [(id(m), t) for m, t in state["training"]],
        [(id(m), k) for m, k in state["hooks"]],
        [(id(p), r, None if g is None else (id(g), g.clone())) for p, r, g in state["params"]],
    )


def _assert_same_state(before, after):
    assert before[0] == after[0] and before[1] == after[1]
    for (p1, r1, g1), (p2, r2, g2) in zip(before[2], after[2]):
        assert (p1, r1) == (p2, r2)
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            assert g1[0] == g2[0] and torch.equal(g1[1], g2[1])


def test_model_state_unchanged_after_success():
    model, _ = _mixed_state_model()
    before = _state_signature(model)
    x = torch.randn(2, 3, 8, 8)
    mg.explain(model, x, [ClassScore(0), ClassScore(1)], ["conv", "features"])
    mg.guided_gradcam(model, x, [ClassScore(0)], "features")
    mg.deconvolution(model, x, [ClassScore(0)])
    mg.occlusion(model, x, [ClassScore(0)], patch=4)
    mg.cam(model, x, "features", model.fc, [0])
    _assert_same_state(before, _state_signature(model))
    assert model.training and not model.relu.training


class Boom(Exception):
    pass


def _raise(*args, **kwargs):
    raise Boom("raised on purpose")


@pytest.mark.parametrize("where", ["target", "forward", "layer hook"])
def test_model_state_unchanged_after_an_exception(where):
    model, _ = _mixed_state_model()
    before = _state_signature(model)
    x = torch.randn(2, 3, 8, 8)
    target = _raise if where == "target" else ClassScore(0)
    handle = None
    if where == "forward":
        handle = model.fc.register_forward_pre_hook(_raise)
        before = _state_signature(model)
    elif where == "layer hook":
        handle = model.features.register_forward_hook(_raise)
        before = _state_signature(model)
    with pytest.raises(Boom):
        mg.explain(model, x, [ClassScore(1), target], "features")
    _assert_same_state(before, _state_signature(model))
    with pytest.raises(Boom):
        mg.guided_backprop(model, x, [ClassScore(1), target])
    _assert_same_state(before, _state_signature(model))
    if handle is not None:
        handle.remove()


def test_layer_errors_are_clear():
    model = GapLinear()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="'featurs' is not a submodule.*Close names: features"):
        mg.explain(model, x, [ClassScore(0)], "featurs")
    with pytest.raises(ValueError, match="not a submodule"):
        mg.explain(model, x, [ClassScore(0)], nn.Conv2d(1, 1, 1))
    model.unused = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="'unused' was never called"):
        mg.explain(model, x, [ClassScore(0)], "unused")
    assert not model.unused._forward_hooks


def test_target_and_input_errors_are_clear():
    model = GapLinear()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"targets\[1\] returned shape \(2, 4\)"):
        mg.explain(model, x, [ClassScore(0), lambda out: out], "features")
    with pytest.raises(ValueError, match="targets is empty"):
        mg.explain(model, x, [], "features")
    with pytest.raises(TypeError, match="sequence of callables"):
        mg.explain(model, x, ClassScore(0), "features")
    with pytest.raises(TypeError, match="inputs must be a Tensor"):
        mg.explain(model, [x], [ClassScore(0)], "features")
    with pytest.raises(IndexError, match="out of range for 4 classes"):
        mg.explain(model, x, [ClassScore(9)], "features")
    with pytest.raises(ValueError, match="3 per-sample indices given for a batch of 2"):
        mg.explain(model, x, [ClassScore([0, 1, 2])], "features")


def test_zero_gradient_warning():
    class CornerHead(GapLinear):
        def forward(self, x):
            a = self.features(self.relu(self.conv(x)))
            return self.fc(a[:, :, 0, 0].detach())  # the head reads nothing through the graph

    model = CornerHead().requires_grad_(False)
    with pytest.raises(RuntimeError, match="do not depend on the captured layer"):
        mg.explain(model, torch.randn(1, 3, 4, 4), [ClassScore(0)], "features")

    class ClsOnly(nn.Module):  # a "ViT" whose head reads only the first token
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 4)
            self.block = nn.Identity()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            tokens = self.embed(x.flatten(2).transpose(1, 2))
            tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
            return self.head(self.block(tokens)[:, 0])

    with pytest.warns(UserWarning, match="every gradient at layer 'block' is zero.*CLS"):
        exp = mg.explain(ClsOnly(), torch.randn(1, 3, 4, 4), [ClassScore(0)], "block")
    assert torch.count_nonzero(exp.layer_maps) == 0


def test_a_layer_whose_output_reaches_nothing_batched():
    """LLaVA's last vision block: its output is unused (the projector reads the block before), so
    torch materializes its batched gradient without the targets' dimension; the engine restores it."""
    class SideBranch(GapLinear):
        def forward(self, x):
            features = self.relu(self.conv(x))
            self.features(features * 2.0)  # run, never read
            return self.fc(features.mean(dim=(2, 3)))

    model = SideBranch()
    with pytest.warns(UserWarning, match="every gradient at layer 'features' is zero"):
        exp = mg.explain(model, torch.randn(2, 3, 8, 8), [ClassScore(0), ClassScore(1), ClassScore(2)], "features",
                         batched=True, layout="bchw")
    assert exp.layer_maps.shape[:2] == (3, 2) and torch.count_nonzero(exp.layer_maps) == 0


def test_a_models_own_hook_on_the_layer_sees_the_captured_tensor():
    """transformers records hidden states with hooks of its own (LLaVA's projector reads one): with
    frozen weights the capture is a new leaf, and the model's hook must record it, not the original."""
    class Recorded(GapLinear):
        def __init__(self):
            super().__init__()
            self.recorded = []
            self.features.register_forward_hook(lambda module, args, output: self.recorded.append(output))

        def forward(self, x):
            self.recorded.clear()
            self.features(self.relu(self.conv(x)))
            return self.fc(self.recorded[-1].mean(dim=(2, 3)))  # reads the hook's record

    model = Recorded()
    x = torch.randn(2, 3, 8, 8)
    reference = mg.explain(model, x, [ClassScore(0), ClassScore(2)], "features").layer_maps
    model.requires_grad_(False)
    frozen = mg.explain(model, x, [ClassScore(0), ClassScore(2)], "features").layer_maps
    torch.testing.assert_close(frozen, reference)
    assert len(model.features._forward_hooks) == 1  # the model's own hook stays, ours is gone


def test_mapping_inputs_and_input_size():
    class KeywordModel(GapLinear):
        def forward(self, pixel_values, scale):
            return super().forward(pixel_values) * scale[:, None]

    model = KeywordModel()
    x = torch.randn(2, 3, 8, 8)
    exp = mg.explain(model, {"pixel_values": x, "scale": torch.tensor([1.0, 2.0])}, [ClassScore(0)], "features")
    assert exp.maps.shape == (1, 2, 8, 8)
    plain = mg.explain(model, {"pixel_values": x, "scale": torch.ones(2)}, [ClassScore(0)], "features")
    torch.testing.assert_close(exp.layer_maps[:, 1], 2 * plain.layer_maps[:, 1])
    torch.testing.assert_close(exp.layer_maps[:, 0], plain.layer_maps[:, 0])


def test_layer_called_twice_warns_and_uses_last_call():
    class Twice(GapLinear):
        def forward(self, x):
            a = self.features(self.relu(self.conv(x)))
            b = self.features(a * 2)
            return self.fc(b.mean(dim=(2, 3)))

    model = Twice()
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(UserWarning, match="ran 2 times"):
        exp = mg.explain(model, x, [ClassScore(0)], "features")
    torch.testing.assert_close(exp.activations, 2 * model.relu(model.conv(x)).detach())
