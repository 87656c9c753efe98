"""attention-gradcam and relevance (Chefer et al. 2021): closed-form relevance on hand-built attention
models, batched equals looped, the caller's model left as it was, every family that reads the image
through attention, the default captioner end to end (API and CLI), FiLM VQA's attention readout and the refusal without one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import mmgradcam as mg
from mmgradcam.engine.attention import (AttentionGraph, AttentionLayer, mha_pre_hook, mha_probabilities)
from mmgradcam.tasks import captioning, vqa

import hf_tiny


class OneCrossAttention(nn.Module):
    """One cross-attention layer whose single text query attends only to image token ``hot``
    (all other keys masked): the output is that token's value, so the relevance is one-hot there."""

    def __init__(self, grid: tuple[int, int] = (3, 4), hot: int = 5, dim: int = 8):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.grid, self.hot = grid, hot
        self.head = nn.Linear(dim, 3)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        n = image.shape[1]
        mask = torch.full((text.shape[1], n), float("-inf"))
        mask[:, self.hot] = 0.0
        out = self.attn(text, image, image, attn_mask=mask, need_weights=False)[0]
        return self.head(out)


def _one_cross():
    torch.manual_seed(0)
    model = OneCrossAttention()
    graph = AttentionGraph([AttentionLayer(model.attn, "cross", mha_probabilities, mha_pre_hook)],
                           model.grid, slice(0, 12))
    inputs = {"image": torch.randn(1, 12, 8), "text": torch.randn(1, 2, 8)}
    return model, graph, inputs


def _target(k):
    return lambda out: out[:, 1, k]


@pytest.mark.parametrize("method", ["relevance", "attention-gradcam"])
def test_one_cross_attention_reading_one_token_gives_a_one_hot_map(method):
    model, graph, inputs = _one_cross()
    readout = torch.zeros(3, 1, 2)
    readout[..., 1] = 1.0  # the row whose output the targets read
    # the target is chosen so that its gradient at the hot token is positive
    exp = mg.explain(model, inputs, [_target(k) for k in range(3)], None, method, attention=graph, readout=readout,
                     input_size=(6, 8))
    assert exp.layer_maps.shape == (3, 1, 3, 4) and exp.maps.shape == (3, 1, 6, 8)
    for t in range(3):
        m = exp.layer_maps[t, 0].flatten()
        others = torch.cat([m[:5], m[6:]])
        assert torch.all(others == 0)
        assert m[5] >= 0
    # relevance of the cross layer with R^tt = I is Ā itself: the hot token gets mean_h max(∇A·A, 0)
    assert any(float(exp.layer_maps[t, 0].flatten()[5]) > 0 for t in range(3))


def test_relevance_self_then_cross_matches_hand_computation():
    """Text self-attention then cross-attention: R^ti = (R̄^tt)ᵀ Ā^ti, with R^tt = I + Ā^tt."""
    from mmgradcam.engine.attention import AttentionPass
    from mmgradcam.methods.relevance import Relevance, _residual_normalized

    torch.manual_seed(1)
    self_p, cross_p = torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 4)
    self_g, cross_g = torch.randn(1, 1, 2, 3, 3), torch.randn(1, 1, 2, 3, 4)
    graph = AttentionGraph([], (2, 2), slice(0, 4))
    readout = torch.tensor([[[0.0, 0.0, 1.0]]])
    computed = AttentionPass(graph, ["self", "cross"], [self_p, cross_p], [self_g, cross_g], readout, torch.zeros(1, 1))
    a_tt = (self_g * self_p).clamp(min=0).mean(2)[0, 0]
    a_ti = (cross_g * cross_p).clamp(min=0).mean(2)[0, 0]
    r_tt = torch.eye(3) + a_tt @ torch.eye(3)
    expected = (_residual_normalized(r_tt).T @ a_ti)[2].reshape(2, 2)
    assert torch.allclose(Relevance().layer_map(computed)[0, 0], expected, atol=1e-6)


def test_joint_relevance_is_identity_plus_weighted_attention_for_one_layer():
    from mmgradcam.engine.attention import AttentionPass
    from mmgradcam.methods.relevance import Relevance

    probs, grads = torch.rand(1, 2, 5, 5), torch.randn(1, 1, 2, 5, 5)
    graph = AttentionGraph([AttentionLayer(nn.Identity(), "joint")], (2, 2), slice(0, 4), text_offset=4)
    computed = AttentionPass(graph, ["joint"], [probs], [grads], torch.ones(1, 1, 1), torch.zeros(1, 1))
    a = (grads * probs).clamp(min=0).mean(2)[0, 0]
    expected = (torch.eye(5) + a)[4, :4].reshape(2, 2)
    assert torch.allclose(Relevance().layer_map(computed)[0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("method", ["relevance", "attention-gradcam"])
def test_batched_equals_looped_for_all_words(default_captioner, shapes_image, method):
    batched = default_captioner.explain(shapes_image, method=method, batched=True)
    looped = default_captioner.explain(shapes_image, caption=batched.caption, method=method, batched=False)
    assert batched.maps.shape[0] == len(batched.words) > 2
    assert torch.allclose(batched.layer_maps, looped.layer_maps, atol=1e-5, rtol=1e-4)
    assert float(batched.layer_maps.sum()) > 0


def _hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_default_captioner_end_to_end_and_state_restored(default_captioner, shapes_image):
    model = default_captioner.model
    model.train()
    before = _hooks(model), [p.requires_grad for p in model.parameters()]
    r = default_captioner.explain(shapes_image, method="relevance")
    assert r.maps.shape == (len(r.words), 128, 128) and r.layer_maps.shape[-2:] == (16, 16)
    assert r.method == "relevance" and float(r.maps.max()) > 0
    assert model.training and (_hooks(model), [p.requires_grad for p in model.parameters()]) == before
    model.eval()
    every = default_captioner.explain(shapes_image, caption=r.caption, method="all")
    assert {"relevance", "attention-gradcam"} <= set(every.methods) and set(mg.available_methods()) <= set(every.methods)
    assert torch.allclose(every.for_method("relevance").layer_maps, r.layer_maps, atol=1e-5)


def test_hooks_removed_when_an_exception_escapes(default_captioner, shapes_image):
    model = default_captioner.model
    before = _hooks(model)
    graph = default_captioner.attention_graph({"pixel_values": torch.zeros(1, 3, 128, 128)})

    def failing(output):
        raise RuntimeError("boom")
    inputs, _ = default_captioner.prepare(shapes_image, "a red circle")
    with pytest.raises(RuntimeError, match="boom"):
        mg.explain(model, inputs, [failing], None, "relevance", attention=graph, readout=torch.ones(1, 1, 4))
    assert _hooks(model) == before


def _film_vqa(readout: str):
    """The shipped VQA model's config with the given readout and random weights."""
    from mmgradcam.tasks import checkpoints
    from tasks.default import DefaultVQA, build_vqa_model

    config = {**checkpoints.read_config(checkpoints.packaged("vqa")), "readout": readout}
    torch.manual_seed(0)
    return DefaultVQA(build_vqa_model(config), config)


def test_film_vqa_with_pooled_readout_refuses_attention_methods(shapes_image):
    model = _film_vqa("pool")
    for method in ("relevance", "attention-gradcam"):
        with pytest.raises(ValueError, match=r"FiLMAnswerNet.*gradcam"):
            model.explain(shapes_image, "what color is the circle ?", method=method)
    assert "relevance" not in model.method_choice("all")


def test_film_vqa_attention_readout_matches_hand_computation(shapes_image):
    """One cross-attention from the question query to the 16x16 regions: relevance is
    mean_h clamp(A * dA), attention-gradcam mean_h A * relu(dA); A recomputed here from the
    module's own projections and dA taken with autograd on that copy."""
    model = _film_vqa("attention")
    attention = model.model.readout_attention
    seen = {}
    handle = attention.register_forward_hook(lambda m, args, out: seen.update(query=args[0], regions=args[1]))
    answers = ["red", "blue"]
    try:
        result = model.explain(shapes_image, "what color is the circle ?", answer=answers,
                               method="relevance,attention-gradcam")
    finally:
        handle.remove()
    query, regions = seen["query"].detach(), seen["regions"].detach()
    heads, dim = attention.num_heads, attention.embed_dim
    w_q, w_k, w_v = attention.in_proj_weight.detach().split(dim)
    b_q, b_k, b_v = attention.in_proj_bias.detach().split(dim)
    q = (query @ w_q.T + b_q).view(1, 1, heads, -1).transpose(1, 2)
    k = (regions @ w_k.T + b_k).view(1, -1, heads, dim // heads).transpose(1, 2)
    v = (regions @ w_v.T + b_v).view(1, -1, heads, dim // heads).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1).requires_grad_(True)
    attended = attention.out_proj((probs @ v).transpose(1, 2).reshape(1, 1, dim))
    net = model.model
    with torch.no_grad():  # the rest of the forward after the attention: the mean-pooled regions
        mean = regions.mean(dim=1)
    logits = net.classifier(torch.cat([attended[:, 0], mean], dim=1))
    for t, answer in enumerate(answers):
        grad, = torch.autograd.grad(logits[0, model.answers.index(answer)], probs, retain_graph=True)
        relevance = (probs * grad).clamp(min=0).mean(dim=1)[0, 0].view(16, 16)
        gradcam = (probs * grad.clamp(min=0)).mean(dim=1)[0, 0].view(16, 16)
        assert torch.allclose(result.for_method("relevance").layer_maps[t], relevance.detach(), atol=1e-6)
        assert torch.allclose(result.for_method("attention-gradcam").layer_maps[t], gradcam.detach(), atol=1e-6)
        assert float(relevance.detach().max()) > 0
    looped = [model.explain(shapes_image, "what color is the circle ?", answer=a, method="relevance")
              for a in answers]
    assert torch.allclose(torch.cat([r.layer_maps for r in looped]), result.for_method("relevance").layer_maps,
                          atol=1e-6)


@pytest.mark.parametrize("build", [hf_tiny.tiny_blip, hf_tiny.tiny_vit_gpt2, hf_tiny.tiny_git])
def test_tiny_hf_families(build):
    model, tokenizer, processor = build()
    implementations = {id(m.config): m.config._attn_implementation for m in model.modules()
                       if hasattr(getattr(m, "config", None), "_attn_implementation")}
    cap = captioning.load(model, tokenizer=tokenizer, image_processor=processor)
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    grid = cap.attention_graph({}).grid
    for method in ("relevance", "attention-gradcam"):
        r = cap.explain(image, "a red circle", method=method)
        assert r.maps.shape == (3, 40, 48) and r.layer_maps.shape == (3, *grid)
        assert float(r.layer_maps.abs().sum()) > 0
    assert implementations == {id(m.config): m.config._attn_implementation for m in model.modules()
                               if hasattr(getattr(m, "config", None), "_attn_implementation")}


def test_eager_attention_restored_after_an_exception():
    from mmgradcam.tasks.hf import eager_attention
    model, _, _ = hf_tiny.tiny_vit_gpt2()
    before = model.config.decoder._attn_implementation
    with pytest.raises(RuntimeError):
        with eager_attention(model):
            assert model.config.decoder._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config.decoder._attn_implementation == before


def test_cli_caption_relevance(tmp_path, shapes_image):
    from mmgradcam.cli import main
    path = tmp_path / "image.png"
    shapes_image.save(path)
    main(["caption", str(path), "--method", "relevance", "--out", str(tmp_path / "out")])
    assert any((tmp_path / "out").iterdir())


def test_eval_scores_the_attention_methods(tmp_path):
    import json

    from mmgradcam.data.shapes import write_split
    from mmgradcam.eval.pipeline import EvalConfig, Evaluation
    from tiny import tiny_captioner

    paths = write_split(tmp_path / "data", "test", 3, seed=9)
    captioner = tiny_captioner(tmp_path / "captioner", max_tokens=20, seed=2)
    config = EvalConfig(instances=str(paths["instances"]), images=str(paths["images"]), out=str(tmp_path / "out"),
                        captions=str(paths["captions"]), model=str(captioner), method="relevance,attention-gradcam",
                        batch_size=2, references=True)
    Evaluation(config, progress=False).run()
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {line["method"] for line in lines} == {"relevance", "attention-gradcam"}


@pytest.mark.parametrize("max_image_length", [-1, 6])
def test_tiny_vilt_single_stream(max_image_length):
    model, tokenizer, processor = hf_tiny.tiny_vilt(max_image_length)
    hooks = _hooks(model)
    answerer = vqa.load(model, tokenizer=tokenizer, image_processor=processor)
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    for method in ("relevance", "attention-gradcam"):
        r = answerer.explain(image, "what color is the circle ?", method=method, top_k=2)
        assert r.maps.shape == (2, 40, 48) and r.layer_maps.shape[0] == 2
        assert float(r.layer_maps.abs().sum()) > 0
        # sampled patches (max_image_length) light up at most that many cells
        if max_image_length > 0:
            assert int((r.layer_maps[0] > 0).sum()) <= max_image_length
    assert _hooks(model) == hooks


def test_tiny_blip_vqa_two_stages():
    """BLIP VQA: the answer decoder reads the question encoder, which reads the image; each
    candidate's map is read at its own tokens."""
    model, tokenizer, processor = hf_tiny.tiny_blip(vqa=True)
    answerer = vqa.load(model, tokenizer=tokenizer, image_processor=processor)
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    inputs, _ = answerer.prepare(image, "what color is the circle ?")
    grid = answerer.attention_graph(inputs).grid
    for method in ("relevance", "attention-gradcam"):
        r = answerer.explain(image, "what color is the circle ?", answer=["red", "blue"], method=method)
        assert r.maps.shape == (2, 40, 48) and r.layer_maps.shape == (2, *grid)
        assert float(r.layer_maps.abs().sum()) > 0
        # random tiny weights give tiny values: compare the shapes of the two maps
        assert not torch.allclose(mg.normalize_maps(r.layer_maps[0]), mg.normalize_maps(r.layer_maps[1]))
