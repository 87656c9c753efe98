"""Devices and precision: device="cpu" and "auto" on a CPU machine, one clear error for a device
that is not there (API and CLI), every tensor the toolkit creates placed on the model's device
(recorded: a factory call that relies on torch's default device would put a tensor on the CPU
while the model is on a GPU), results on the CPU in float32, and bfloat16 maps that track the
float32 maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmgradcam.engine.device import resolve_device, resolve_dtype
from mmgradcam.tasks import captioning, vqa

import hf_tiny
from device_check import DefaultDeviceRecorder


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))


def test_cpu_explicit_and_auto_on_a_cpu_machine(monkeypatch):
    assert captioning.load("default", device="cpu").device == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        assert vqa.load("default").device == torch.device("cpu")  # "auto" is the default
    # "auto" prefers CUDA, then MPS (availability faked; nothing is moved)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("mmgradcam.engine.device._mps_available", lambda: True)
    assert resolve_device(None) == torch.device("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_there_is_one_clear_error(tmp_path, shapes_image, capsys):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device '{device}' is not available.*no CUDA GPU"):
            captioning.load("default", device=device)
    with pytest.raises(ValueError, match="not a device name"):
        vqa.load("default", device="gpu0")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        vqa.load("default", dtype="int8")
    from mmgradcam.cli import main

    path = tmp_path / "image.png"
    shapes_image.save(path)
    for command in (["caption", str(path)], ["vqa", str(path), "what color is the circle ?"]):
        assert main(command + ["--device", "cuda", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "device 'cuda' is not available" in err[0] and "Traceback" not in err[0]


def test_a_model_object_stays_on_its_device_unless_one_is_named():
    model, tokenizer, processor = hf_tiny.tiny_git()
    adapter = captioning.load(model, tokenizer=tokenizer, image_processor=processor)
    assert adapter.device == torch.device("cpu") and adapter.dtype is None
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float32") is None


def _every_call(adapter, image, task):
    if task == "captioning":
        result = adapter.explain(image, method="all")
        adapter.explain_batch([image, image], method=adapter.default_method)
        adapter.generate_batch([image, image])
        return [result]
    question = "what color is the circle ?"
    return [adapter.explain(image, question, method="all", top_k=2),
            adapter.explain(image, question, top_k=1, score="logprob")]


@pytest.mark.parametrize("family", ["default-captioner", "default-vqa", "blip", "git", "vit-gpt2", "vilt",
                                    "blip-vqa", "llava", "llava-vqa", "paligemma", "paligemma-vqa", "gemma3",
                                    "gemma3-vqa", "blip2", "blip2-vqa", "instructblip", "instructblip-vqa",
                                    "qwen2-vl", "qwen2-vl-vqa", "qwen2.5-vl", "qwen2.5-vl-vqa", "florence2",
                                    "florence2-vqa", "idefics3", "idefics3-vqa", "llava-next", "llava-onevision-vqa"])
def test_every_tensor_the_toolkit_creates_names_its_device(family, shapes_image, photo):
    if family.startswith("default"):
        task = "captioning" if family == "default-captioner" else "vqa"
        adapter, image = (captioning if task == "captioning" else vqa).load("default"), shapes_image
    elif family.startswith(("llava-next", "llava-onevision")):  # any-resolution tiles: the model and its processor
        task = "vqa" if family.endswith("-vqa") else "captioning"
        model, processor = hf_tiny.tiny_llava_next(onevision=family.startswith("llava-onevision"))
        adapter, image = (captioning if task == "captioning" else vqa).load(model, processor), photo
    elif family.startswith(("llava", "paligemma", "gemma3", "florence2", "idefics3")):  # the model and its processor
        task = "vqa" if family.endswith("-vqa") else "captioning"
        model, processor = getattr(hf_tiny, f"tiny_{family.removesuffix('-vqa')}")()
        adapter, image = (captioning if task == "captioning" else vqa).load(model, processor), photo
    elif family.startswith(("blip2", "instructblip")):  # the model and its processor
        task = "vqa" if family.endswith("-vqa") else "captioning"
        model, processor = hf_tiny.tiny_blip2(instruct=family.startswith("instructblip"),
                                              text="llama" if family.startswith("instructblip") else "opt")
        adapter, image = (captioning if task == "captioning" else vqa).load(model, processor), photo
    elif family.startswith("qwen"):  # Qwen2-VL / Qwen2.5-VL: the model and its processor
        task = "vqa" if family.endswith("-vqa") else "captioning"
        model, processor = hf_tiny.tiny_qwen2_vl("2.5" if family.startswith("qwen2.5") else "2")
        adapter, image = (captioning if task == "captioning" else vqa).load(model, processor), photo
    else:
        build = {"blip": hf_tiny.tiny_blip, "git": hf_tiny.tiny_git, "vit-gpt2": hf_tiny.tiny_vit_gpt2,
                 "vilt": hf_tiny.tiny_vilt, "blip-vqa": lambda: hf_tiny.tiny_blip(vqa=True)}[family]
        model, tokenizer, processor = build()
        task = "vqa" if family in ("vilt", "blip-vqa") else "captioning"
        loader = captioning if task == "captioning" else vqa
        adapter, image = loader.load(model, tokenizer=tokenizer, image_processor=processor), photo
    with DefaultDeviceRecorder() as recorder:
        results = _every_call(adapter, image, task)
    assert recorder.found == []
    for result in results:  # results come back on the CPU in float32
        for maps, layer_maps, _ in result.method_maps.values():
            assert maps.device.type == "cpu" and maps.dtype == torch.float32
            assert layer_maps.device.type == "cpu" and layer_maps.dtype == torch.float32


def test_the_recorder_catches_a_tensor_made_on_the_default_device():
    import device_check

    with DefaultDeviceRecorder() as recorder:
        exec(compile("import torch\ntorch.zeros(3)\ntorch.zeros(3, device='cpu')",
                     str(device_check.ROOT / "mmgradcam" / "probe.py"), "exec"))
    assert recorder.found == ["mmgradcam/probe.py:2 zeros"]


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_bfloat16_maps_track_float32_maps(shapes_image):
    """bf16 autocast forward, float32 maps: every word's and answer's map correlates >= 0.95 with
    the float32 map (default method and the attention methods)."""
    full, half = captioning.load("default"), captioning.load("default", dtype="bfloat16")
    methods = f"{full.default_method},relevance"
    reference = full.explain(shapes_image, method=methods)
    low = half.explain(shapes_image, caption=reference.caption, method=methods)
    for name in methods.split(","):
        a, b = reference.method_maps[name][0], low.method_maps[name][0]
        assert b.dtype == torch.float32
        correlations = [_correlation(x, y) for x, y in zip(a, b) if float(x.abs().sum()) > 0]
        assert len(correlations) >= 3 and min(correlations) >= 0.95, (name, correlations)
    full_vqa, half_vqa = vqa.load("default"), vqa.load("default", dtype="bfloat16")
    question = "what color is the circle ?"
    a = full_vqa.explain(shapes_image, question, top_k=3)
    b = half_vqa.explain(shapes_image, question, answer=a.answers)
    assert min(_correlation(x, y) for x, y in zip(a.maps, b.maps)) >= 0.95
    assert b.answers[0] == a.answers[0]
