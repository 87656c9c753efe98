"""End to end on real architectures with random weights: torchvision ResNet-18 and a tiny HF ViT."""
import pytest
import torch
import torchvision

import mmgradcam as mg
from mmgradcam.engine import find_modules
from mmgradcam.targets import ClassLogProb, ClassScore


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def test_resnet18_all_methods_end_to_end(resnet):
    x = torch.randn(2, 3, 128, 128)
    targets = [ClassScore(3), ClassLogProb(7), ClassScore([1, 2])]
    for method in mg.available_methods():
        exp = mg.explain(resnet, x, targets, resnet.layer3, method)
        assert exp.layer_maps.shape == (3, 2, 8, 8)
        assert exp.maps.shape == (3, 2, 128, 128)
        assert torch.isfinite(exp.maps).all() and (exp.maps >= 0).all()
        looped = mg.explain(resnet, x, targets, "layer3", method, batched=False)
        torch.testing.assert_close(exp.layer_maps, looped.layer_maps, rtol=1e-5, atol=1e-6)
    logits = resnet(x)
    torch.testing.assert_close(exp.scores[0], logits[:, 3].detach())


def test_resnet18_cam_identity(resnet):
    """layer4 -> avgpool -> fc: Grad-CAM * (h*w) == CAM."""
    x = torch.randn(2, 3, 128, 128)
    classes = [0, 5, [9, 4]]
    grad = mg.explain(resnet, x, [ClassScore(c) for c in classes], "layer4")
    cam = mg.cam(resnet, x, "layer4", resnet.fc, classes)
    h, w = grad.layer_maps.shape[-2:]
    torch.testing.assert_close(grad.signed_layer_maps * (h * w), cam.signed_layer_maps, rtol=1e-4, atol=1e-5)


def test_resnet18_guided_and_occlusion(resnet):
    x = torch.randn(1, 3, 64, 64)
    gb = mg.guided_backprop(resnet, x, [ClassScore(1), ClassScore(2)])
    assert gb.shape == (2, 1, 3, 64, 64) and gb.abs().sum() > 0
    gg = mg.guided_gradcam(resnet, x, [ClassScore(1)], "layer4")
    assert gg.shape == (1, 1, 3, 64, 64)
    occ = mg.occlusion(resnet, x, [ClassScore(1)], patch=16, stride=16)
    assert occ.shape == (1, 1, 64, 64)


@pytest.fixture(scope="module")
def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, num_labels=5)
    return ViTForImageClassification(config).eval()


def test_tiny_vit_tokens_end_to_end(tiny_vit):
    blocks = find_modules(tiny_vit, "ViTLayer")
    assert len(blocks) == 3
    x = torch.randn(2, 3, 32, 32)
    targets = [ClassScore(0), ClassScore(4)]
    # The last block: its image tokens never reach the CLS-only head, so every gradient is zero.
    with pytest.warns(UserWarning, match="every gradient at layer .* is zero"):
        last = mg.explain(tiny_vit, {"pixel_values": x}, targets, blocks[-1][1])
    assert torch.count_nonzero(last.layer_maps) == 0
    # The block before it: a 4x4 grid after dropping the CLS token, maps at 32x32.
    name = blocks[-2][0]
    exp = mg.explain(tiny_vit, {"pixel_values": x}, targets, name)
    assert exp.layer_maps.shape == (2, 2, 4, 4) and exp.maps.shape == (2, 2, 32, 32)
    assert torch.count_nonzero(exp.layer_maps) > 0
    torch.testing.assert_close(exp.scores, tiny_vit(pixel_values=x).logits[:, [0, 4]].T.detach())
    looped = mg.explain(tiny_vit, {"pixel_values": x}, targets, name, batched=False)
    torch.testing.assert_close(exp.layer_maps, looped.layer_maps, rtol=1e-5, atol=1e-6)
    # the CLS prefix is dropped: the captured token grid equals the block output's patch tokens
    captured = {}
    handle = blocks[-2][1].register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
    with torch.no_grad():
        tiny_vit(pixel_values=x)
    handle.remove()
    out = captured["o"][0] if isinstance(captured["o"], tuple) else captured["o"]
    torch.testing.assert_close(exp.activations, out[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
