"""Several CAM methods from one pass: the same maps as separate runs, one forward, one backward."""
import pytest
import torch
from PIL import Image

import mmgradcam as mg
from mmgradcam.data.shapes import make_image
from mmgradcam.methods.base import method_names
from mmgradcam.targets import ClassScore
from mmgradcam.tasks import captioning, vqa
from models import GapLinear
from tiny import SHAPES_WORDS, tiny_captioner, tiny_vqa


class CountingForward:
    """Counts forward calls of a module through a hook (removed on exit)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_method_names_parse_lists_commas_and_all():
    assert method_names("gradcam") == ["gradcam"]
    assert method_names("Grad-CAM++, hirescam,gradcam++") == ["gradcam++", "hirescam"]
    assert method_names(["layercam", "gradcam"]) == ["layercam", "gradcam"]
    assert method_names("all") == mg.available_methods()
    with pytest.raises(ValueError, match="unknown method 'gradkam'"):
        method_names("gradcam,gradkam")
    with pytest.raises(ValueError, match="names no method"):
        method_names(" , ")
    with pytest.raises(TypeError):
        method_names(3)


def test_several_methods_equal_separate_runs_from_one_forward_and_backward(monkeypatch):
    torch.manual_seed(0)
    model = GapLinear()
    x = torch.randn(2, 3, 8, 8)
    targets = [ClassScore(0), ClassScore([1, 2])]
    backward_calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backward_calls.append(1) or real_grad(*a, **k))
    with CountingForward(model) as forward:
        together = mg.explain(model, x, targets, "features", method="all")
    assert forward.calls == 1 and len(backward_calls) == 1
    assert list(together) == mg.available_methods()
    for name, exp in together.items():
        alone = mg.explain(model, x, targets, "features", method=name)
        assert exp.method == name
        torch.testing.assert_close(exp.layer_maps, alone.layer_maps, rtol=0, atol=0)
        torch.testing.assert_close(exp.maps, alone.maps, rtol=0, atol=0)
    # a single name still gives one Explanation; a list of one gives a dict
    assert isinstance(mg.explain(model, x, targets, "features", "hirescam"), mg.Explanation)
    assert list(mg.explain(model, x, targets, "features", ["hirescam"])) == ["hirescam"]
    # with a list of layers: one dict per layer
    per_layer = mg.explain(model, x, targets, ["features", "conv"], "gradcam,layercam")
    assert [list(d) for d in per_layer] == [["gradcam", "layercam"]] * 2


@pytest.fixture(scope="module")
def image():
    pixels, _, _ = make_image(3, seed=11, size=64)
    return Image.fromarray(pixels)


def test_captioner_methods_from_one_pass_equal_separate_runs(tmp_path_factory, image):
    captioner = captioning.load(str(tiny_captioner(tmp_path_factory.mktemp("cap"))))
    caption = "a red circle and a blue square"
    with CountingForward(captioner.model) as forward:
        result = captioner.explain(image, caption, method="gradcam,hirescam,layercam")
    assert forward.calls == 1
    assert result.methods == ["gradcam", "hirescam", "layercam"] and result.method == "gradcam"
    for name in result.methods:
        alone = captioner.explain(image, caption, method=name)
        view = result.for_method(name)
        assert view.method == name
        torch.testing.assert_close(view.maps, alone.maps, rtol=0, atol=1e-7)
        torch.testing.assert_close(view.caption_map, alone.caption_map, rtol=0, atol=1e-7)
    assert not torch.allclose(result.for_method("gradcam").maps, result.for_method("hirescam").maps)
    assert set(result.arrays()) >= {"maps@gradcam", "maps@hirescam", "maps@layercam"}
    with pytest.raises(ValueError, match="unknown method 'xgradcam'"):
        result.for_method("xgradcam")  # not computed in this pass


def test_vqa_methods_from_one_pass_equal_separate_runs(tmp_path_factory, image):
    model = vqa.load(str(tiny_vqa(tmp_path_factory.mktemp("vqa"), SHAPES_WORDS + ["what", "color", "?"],
                                  ["red", "blue", "green"])))
    question = "what color is the circle ?"
    result = model.explain(image, question, answer=["red", "blue"], contrast="green", method=["layercam", "gradcam"])
    assert result.methods == ["layercam", "gradcam"] and result.method == "layercam"
    for name in result.methods:
        alone = model.explain(image, question, answer=["red", "blue"], contrast="green", method=name)
        view = result.for_method(name)
        torch.testing.assert_close(view.maps, alone.maps, rtol=0, atol=1e-7)
        torch.testing.assert_close(view.contrast_map, alone.contrast_map, rtol=0, atol=1e-7)
