"""Generation with a key/value cache equals generation without it: the default captioner's own
incremental decoder, and the Hugging Face families' generate(use_cache=True)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mmgradcam.data.shapes import make_image
from mmgradcam.tasks import captioning, checkpoints, vqa
from mmgradcam.tasks.default import build_caption_model, cache_unsupported
from hf_tiny import tiny_blip, tiny_git, tiny_vit_gpt2

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def shapes_pixels(default_captioner):
    images = [Image.fromarray(make_image(i, seed=4242)[0]) for i in range(12)]
    return torch.cat([default_captioner.preprocess(image)[0]["pixel_values"] for image in images])


def random_caption_net() -> nn.Module:
    config = checkpoints.read_config(checkpoints.packaged("captioner"))
    torch.manual_seed(3)
    return build_caption_model(config).eval()


def assert_steps_match(model, pixel_values: torch.Tensor, ids: torch.Tensor, bos_id: int) -> None:
    """Teacher-forced over ``ids``: every cached step's logits equal the full decoder's last row."""
    prefix = torch.cat([torch.full((len(ids), 1), bos_id), ids], dim=1)
    with torch.no_grad():
        memory = model.memory(pixel_values)
        cache = model.start_cache(memory)
        for t in range(prefix.shape[1] - 1):
            cached = model.decode_step(cache, prefix[:, t])
            full = model.decode(memory, prefix[:, :t + 1])[:, -1]
            torch.testing.assert_close(cached, full, **TOLERANCE, msg=lambda m: f"step {t}: {m}")


def test_shipped_captioner_cached_equals_uncached(default_captioner, shapes_pixels):
    model, vocab = default_captioner.model, default_captioner.vocab
    cached = model.greedy(shapes_pixels, vocab.bos_id, vocab.eos_id)  # the cache is the default
    uncached = model.greedy(shapes_pixels, vocab.bos_id, vocab.eos_id, use_cache=False)
    assert torch.equal(cached, uncached)
    assert (cached == vocab.eos_id).any(dim=1).all()  # real captions that end
    assert_steps_match(model, shapes_pixels, uncached, vocab.bos_id)


def test_random_caption_net_cached_equals_uncached():
    model = random_caption_net()
    pixels = torch.randn(6, 3, 128, 128)
    # eos_id -1 is no token: generation runs to the model's limit, so every position is compared
    cached = model.greedy(pixels, 1, -1, use_cache=True)
    uncached = model.greedy(pixels, 1, -1, use_cache=False)
    assert cached.shape[1] == model.max_tokens - 1
    assert torch.equal(cached, uncached)
    assert_steps_match(model, pixels, uncached, 1)


def test_cache_refuses_unimplemented_layers_and_greedy_falls_back():
    model = random_caption_net()
    assert cache_unsupported(model.decoder) is None
    post_norm = nn.TransformerDecoderLayer(128, 4, dim_feedforward=512, batch_first=True, norm_first=False)
    model.decoder.layers[1] = post_norm.eval()
    memory = model.memory(torch.randn(2, 3, 128, 128))
    with pytest.raises(NotImplementedError, match=r"decoder.layers\[1\] has norm_first=False"):
        model.start_cache(memory)
    pixels = torch.randn(2, 3, 128, 128)
    with pytest.warns(UserWarning, match="generating without the cache"):
        fallback = model.greedy(pixels, 1, 2)
    assert torch.equal(fallback, model.greedy(pixels, 1, 2, use_cache=False))
    # an activation that is not known to act on each position alone is refused too
    model.decoder.layers[1] = nn.TransformerDecoderLayer(128, 4, dim_feedforward=512, batch_first=True, norm_first=True,
                                                         activation=lambda x: x - x.mean(dim=1, keepdim=True))
    with pytest.raises(NotImplementedError, match="activation"):
        model.start_cache(memory)


def test_beam_search_unchanged(default_captioner, shapes_pixels):
    """Beam search does not use the cache; with one beam it picks the same words as greedy."""
    model, vocab = default_captioner.model, default_captioner.vocab
    greedy = model.greedy(shapes_pixels[:4], vocab.bos_id, vocab.eos_id)
    for pixels, row in zip(shapes_pixels[:4], greedy.tolist()):
        expected = row[:row.index(vocab.eos_id) + 1]
        assert model.beam(pixels[None], vocab.bos_id, vocab.eos_id, beam_size=1) == expected
    assert default_captioner.generate_from_pixels(shapes_pixels[:2], beam_size=3)  # runs, gives captions


# ----------------------------------------------------------------------------- transformers families
BUILDERS = {"blip": tiny_blip, "git": tiny_git, "vit_gpt2": tiny_vit_gpt2}
IMAGES = [Image.fromarray((np.random.default_rng(i).random((40, 60, 3)) * 255).astype("uint8")) for i in range(3)]


def recording_generate(model: nn.Module, calls: list) -> None:
    original = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs.get("use_cache"))
        return original(*args, **kwargs)
    model.generate = generate


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("beam_size", [1, 2])
def test_hf_generate_with_cache_equals_without(family, beam_size):
    model, tokenizer, image_processor = BUILDERS[family]()
    captioner = captioning.load(model, tokenizer=tokenizer, image_processor=image_processor)
    calls: list = []
    recording_generate(captioner.model, calls)
    pixels = torch.cat([captioner.preprocess(image)[0]["pixel_values"] for image in IMAGES])
    cached = captioner.generate_ids(pixels, beam_size)
    captioner.generation_cache = False
    uncached = captioner.generate_ids(pixels, beam_size)
    assert calls == [True, False]
    assert cached.shape[1] > 2 and torch.equal(cached, uncached)


def test_blip_vqa_generate_with_cache_equals_without():
    model, tokenizer, image_processor = tiny_blip(vqa=True)
    blip = vqa.load(model, tokenizer=tokenizer, image_processor=image_processor)
    calls: list = []
    recording_generate(blip.blip, calls)
    inputs, _ = blip.prepare(IMAGES[0], "what color is the circle ?")
    cached = blip.ranked_answers(inputs, top_k=3)
    blip.generation_cache = False
    blip._generated.clear()
    uncached = blip.ranked_answers(inputs, top_k=3)
    assert calls == [True, False]
    assert [a for a, _ in cached] == [a for a, _ in uncached]
    assert [s for _, s in cached] == pytest.approx([s for _, s in uncached], rel=1e-5, abs=1e-7)
