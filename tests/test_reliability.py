"""State after exceptions anywhere (property-based), determinism, and a short soak."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import mmgradcam as mg
from mmgradcam.data.shapes import make_image
from mmgradcam.targets import ClassScore
from models import GapLinear

ROOT = Path(__file__).resolve().parents[1]


class Boom(Exception):
    pass


def raising(*args, **kwargs):
    raise Boom("raised on purpose")


class BackwardBoom(torch.nn.Module):
    """Identity in forward; raises while gradients flow back through it."""

    def forward(self, x):
        if x.requires_grad:
            x.register_hook(raising)
        return x


class Net(GapLinear):
    def __init__(self):
        super().__init__(channels=4, classes=3)
        self.extra = BackwardBoom()
        self.armed = False

    def forward(self, x):
        a = self.features(self.relu(self.conv(x)))
        if self.armed:
            a = self.extra(a)
        return self.fc(a.mean(dim=(2, 3)))


def signature(model):
    return (
        [m.training for m in model.modules()],
        [tuple(getattr(m, name).keys()) for m in model.modules()
         for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")],
        [(p.requires_grad, None if p.grad is None else (id(p.grad), p.grad.clone())) for p in model.parameters()],
    )


def same(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    for (r1, g1), (r2, g2) in zip(a[2], b[2]):
        assert r1 == r2 and (g1 is None) == (g2 is None)
        if g1 is not None:
            assert g1[0] == g2[0] and torch.equal(g1[1], g2[1])


WHERE = ["target", "pre-hook", "hook", "forward", "backward", "guided-target", "occlusion-target", "cam-hook"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(WHERE), module=st.sampled_from(["conv", "relu", "features", "fc"]),
       train=st.booleans(), frozen=st.booleans(), with_grad=st.booleans(), batched=st.sampled_from(["auto", False]))
def test_model_is_restored_after_an_exception_anywhere(where, module, train, frozen, with_grad, batched):
    torch.manual_seed(0)
    model = Net()
    model.train(train)
    model.relu.train(not train)
    if frozen:
        model.conv.requires_grad_(False)
    if with_grad:
        model.fc.weight.grad = torch.ones_like(model.fc.weight)
    user_hook = model.conv.register_forward_hook(lambda m, i, o: None)
    module_obj = getattr(model, module)
    handle = None
    if where == "pre-hook":
        handle = module_obj.register_forward_pre_hook(raising)
    elif where in ("hook", "cam-hook"):
        handle = module_obj.register_forward_hook(raising)
    elif where == "forward":
        handle = module_obj.register_forward_pre_hook(lambda m, i: raising())
    elif where == "backward":
        model.armed = True
    before = signature(model)
    x = torch.randn(2, 3, 8, 8)
    targets = [ClassScore(0), raising if "target" in where else ClassScore(1)]
    with pytest.raises(Boom):
        if where == "guided-target":
            mg.guided_backprop(model, x, targets, batched=batched)
        elif where == "occlusion-target":
            mg.occlusion(model, x, targets, patch=4)
        elif where == "cam-hook":
            mg.cam(model, x, "features", model.fc, [0])
        else:
            mg.explain(model, x, targets, "features", batched=batched)
    same(before, signature(model))
    if handle is not None:
        handle.remove()
    user_hook.remove()


def test_maps_are_bit_identical_in_one_process_and_across_processes(tmp_path):
    from mmgradcam.tasks import captioning

    captioner = captioning.load("default")
    image = Image.fromarray(make_image(8, seed=31)[0])
    first = captioner.explain(image)
    second = captioner.explain(image)
    assert first.caption == second.caption and torch.equal(first.maps, second.maps)
    code = ("import sys, numpy as np; from PIL import Image; from mmgradcam.tasks import captioning; "
            "from mmgradcam.data.shapes import make_image; "
            "r = captioning.load('default').explain(Image.fromarray(make_image(8, seed=31)[0])); "
            "np.save(sys.argv[1], r.maps.numpy())")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "maps.npy")], check=True, timeout=300)
    assert np.array_equal(np.load(tmp_path / "maps.npy"), first.maps.numpy())


def test_short_soak_keeps_memory_flat(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--images", "120", "--questions", "120",
                             "--every", "20", "--warmup", "40", "--json", str(tmp_path / "soak.json")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["growth_after_warmup"] < 0.05, report
