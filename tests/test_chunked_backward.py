"""max_targets_per_backward: the targets go in chunks, each one batched backward over the same
forward graph; chunked equals unchunked, a chunk that runs out of memory is retried at half the
size, and k targets per backward make ceil(T / k) backwards."""
import math
import warnings

import pytest
import torch

import mmgradcam as mg
from mmgradcam.engine import gradients
from mmgradcam.engine.gradients import target_gradients, target_scores
from mmgradcam.targets import ClassLogProb, ClassScore
from mmgradcam.tasks import vqa
from models import GapLinear

BAD_VALUES = [0, -3, 1.5, "4", True]


def small_graph(num_targets: int = 7, batch: int = 3):
    """(scores (T, B), [layer activation, an earlier tensor]) of one forward through a small CNN."""
    model = GapLinear(channels=6, classes=num_targets)
    x = torch.randn(batch, 3, 10, 10)
    hidden = model.conv(x)
    activation = model.relu(hidden)
    output = model.fc(activation.mean(dim=(2, 3)))
    targets = [ClassScore(t) if t % 2 else ClassLogProb(t) for t in range(num_targets)]
    targets.append(lambda out: out.softmax(-1)[:, 0] * out[:, -1])  # a target mixing two outputs
    return target_scores(targets, output, batch), [activation, hidden]


def count_batched_backwards(monkeypatch) -> list[int]:
    """Wraps torch.autograd.grad; the list gets each batched call's number of targets."""
    calls: list[int] = []
    real = torch.autograd.grad

    def counting(outputs, inputs, grad_outputs=None, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls.append(int(grad_outputs.shape[0]))
        return real(outputs, inputs, grad_outputs=grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


def fake_out_of_memory_above(monkeypatch, largest: int) -> list[int]:
    """Makes every batched backward of more than ``largest`` targets raise OutOfMemoryError."""
    attempts: list[int] = []
    real = gradients._batched_grads

    def limited(scores, tensors, start=0, stop=None):
        stop = scores.shape[0] if stop is None else stop
        attempts.append(stop - start)
        if stop - start > largest:
            raise torch.OutOfMemoryError("fake: out of memory")
        return real(scores, tensors, start, stop)

    monkeypatch.setattr(gradients, "_batched_grads", limited)
    return attempts


def out_of_memory_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "ran out of memory" in str(w.message)]


# ----------------------------------------------------------------------------- engine
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 8, 20, None])
def test_chunked_equals_unchunked(chunk):
    scores, tensors = small_graph()
    total = scores.shape[0]  # 8 targets
    unchunked = target_gradients(scores, tensors, batched=True, max_targets_per_backward=total)
    looped = target_gradients(scores, tensors, batched=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no retry
        chunked = target_gradients(scores, tensors, batched=True, max_targets_per_backward=chunk)
    for got, want, loop in zip(chunked, unchunked, looped):
        assert got.shape == want.shape and got.shape[0] == total
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(got, loop, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 8, 20])
def test_chunk_size_k_makes_ceil_t_over_k_backwards(monkeypatch, chunk):
    scores, tensors = small_graph()
    calls = count_batched_backwards(monkeypatch)
    target_gradients(scores, tensors, max_targets_per_backward=chunk)
    total = scores.shape[0]
    assert len(calls) == math.ceil(total / chunk)
    assert sum(calls) == total and max(calls) == min(chunk, total)


def test_auto_off_cuda_is_64_targets_per_backward(monkeypatch):
    scores, tensors = small_graph(num_targets=69)  # 70 targets
    calls = count_batched_backwards(monkeypatch)
    target_gradients(scores, tensors)
    assert calls == [gradients.CPU_TARGETS_PER_BACKWARD, 70 - gradients.CPU_TARGETS_PER_BACKWARD]


def test_out_of_memory_halves_the_chunk_warns_once_and_gives_the_same_numbers(monkeypatch):
    scores, tensors = small_graph()
    want = target_gradients(scores, tensors, batched=True)
    attempts = fake_out_of_memory_above(monkeypatch, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = target_gradients(scores, tensors)  # auto: all 8 targets in one backward off CUDA
    assert attempts == [8, 4, 2, 2, 2, 2]  # 8 and 4 fail, then 4 chunks of 2
    messages = out_of_memory_warnings(caught)
    assert len(messages) == 1 and "with 8 targets" in messages[0] and "max_targets_per_backward=2" in messages[0]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_out_of_memory_at_one_target_is_raised_not_looped(monkeypatch):
    scores, tensors = small_graph()
    fake_out_of_memory_above(monkeypatch, 0)
    for batched in ("auto", True):
        with pytest.raises(torch.OutOfMemoryError):
            target_gradients(scores, tensors, batched=batched, max_targets_per_backward=4)


def test_auto_on_cuda_sizes_the_rest_from_the_first_chunk(monkeypatch):
    """The CUDA path with torch.cuda's memory readings faked (no GPU needed): the first chunk of 8
    raises the peak by 100 bytes per target; 1250 free bytes * 0.8 / 100 = 10 targets per chunk."""
    scores, tensors = small_graph(num_targets=39)  # 40 targets
    monkeypatch.setattr(gradients, "_measures_cuda", lambda device: True)
    allocated = {"now": 1000}
    emptied = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["now"] + 800)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1250, 10_000))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    calls = count_batched_backwards(monkeypatch)
    got = target_gradients(scores, tensors)
    assert calls == [8, 10, 10, 10, 2]
    want = target_gradients(scores, tensors, batched=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    # an out-of-memory retry empties the cache and caps the measured size at the size that worked
    attempts = fake_out_of_memory_above(monkeypatch, 4)
    with pytest.warns(UserWarning, match="ran out of memory with 8 targets"):
        target_gradients(scores, tensors)
    assert emptied and attempts[:2] == [8, 4] and max(attempts[2:]) == 4


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_values_are_refused(value):
    scores, tensors = small_graph()
    with pytest.raises(ValueError, match="max_targets_per_backward"):
        target_gradients(scores, tensors, max_targets_per_backward=value)
    model = GapLinear(channels=4, classes=3)
    with pytest.raises(ValueError, match="max_targets_per_backward"):
        mg.explain(model, torch.randn(1, 3, 8, 8), [ClassScore(0)], "features", max_targets_per_backward=value)


def test_explain_passes_the_chunk_size_on(monkeypatch):
    model = GapLinear(channels=4, classes=5)
    x = torch.randn(2, 3, 8, 8)
    targets = [ClassScore(i) for i in range(5)]
    whole = mg.explain(model, x, targets, "features", "gradcam,guided-gradcam")
    calls = count_batched_backwards(monkeypatch)
    chunked = mg.explain(model, x, targets, "features", "gradcam,guided-gradcam", max_targets_per_backward=2)
    assert calls == [2, 2, 1, 2, 2, 1]  # the layer's pass, then Guided Backprop's pass over the input
    for name in whole:
        torch.testing.assert_close(chunked[name].layer_maps, whole[name].layer_maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked["guided-gradcam"].pixel_maps, whole["guided-gradcam"].pixel_maps,
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- default models, end to end
@pytest.fixture(scope="module")
def caption(default_captioner, shapes_image):
    return default_captioner.generate(shapes_image)


CAM_METHODS = ",".join(mg.available_methods())


@pytest.mark.parametrize("method", [CAM_METHODS, "relevance"])
def test_captioner_all_words_chunked_equals_unchunked(default_captioner, shapes_image, caption, method, monkeypatch):
    whole = default_captioner.explain(shapes_image, caption, method=method)
    total = len(whole.words) + 1  # every word and the whole caption
    assert total > 4
    calls = count_batched_backwards(monkeypatch)
    for chunk in [1, 2, 3, total - 1, total, total + 5]:
        calls.clear()
        chunked = default_captioner.explain(shapes_image, caption, method=method, max_targets_per_backward=chunk)
        assert len(calls) == math.ceil(total / chunk)
        assert chunked.words == whole.words
        for name in whole.methods:
            for got, want in zip(chunked.method_maps[name], whole.method_maps[name]):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(chunked.word_logprobs), torch.tensor(whole.word_logprobs))


@pytest.mark.parametrize("method", [CAM_METHODS, "relevance"])
def test_captioner_out_of_memory_fallback(default_captioner, shapes_image, caption, method, monkeypatch):
    whole = default_captioner.explain(shapes_image, caption, method=method)
    attempts = fake_out_of_memory_above(monkeypatch, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chunked = default_captioner.explain(shapes_image, caption, method=method)
    assert max(attempts) > 2 and len(out_of_memory_warnings(caught)) == 1
    for name in whole.methods:
        torch.testing.assert_close(chunked.for_method(name).maps, whole.for_method(name).maps, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", BAD_VALUES)
def test_task_adapters_refuse_bad_values(default_captioner, shapes_image, caption, value):
    with pytest.raises(ValueError, match="max_targets_per_backward"):
        default_captioner.explain(shapes_image, caption, max_targets_per_backward=value)
    with pytest.raises(ValueError, match="max_targets_per_backward"):
        default_captioner.explain_batch([shapes_image], max_targets_per_backward=value)
    with pytest.raises(ValueError, match="max_targets_per_backward"):
        vqa_model().explain(shapes_image, "what color is the circle?", max_targets_per_backward=value)


_VQA = []


def vqa_model():
    if not _VQA:
        _VQA.append(vqa.load("default"))
    return _VQA[0]


def test_vqa_several_answers_chunked_equals_unchunked(shapes_image):
    model = vqa_model()
    question = "what color is the circle?"
    whole = model.explain(shapes_image, question, top_k=4)
    chunked = model.explain(shapes_image, question, top_k=4, max_targets_per_backward=1)
    assert chunked.answers == whole.answers and len(whole.answers) == 4
    torch.testing.assert_close(chunked.maps, whole.maps, rtol=1e-4, atol=1e-5)


def test_cli_option_reaches_the_backward_and_eval_config(tmp_path, shapes_image, monkeypatch, capsys):
    from mmgradcam.cli import build_parser, main
    from mmgradcam.eval.config import EvalConfig

    shapes_image.save(tmp_path / "shapes.png")
    calls = count_batched_backwards(monkeypatch)
    assert main(["vqa", str(tmp_path / "shapes.png"), "what color is the circle?", "--top-k", "3",
                 "--max-targets-per-backward", "1", "--out", str(tmp_path / "v")]) == 0
    assert calls == [1, 1, 1]
    for bad in ["0", "-2", "x"]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["caption", "img.png", "--max-targets-per-backward", bad])
    assert "--max-targets-per-backward: expected a positive integer, got 'x'" in capsys.readouterr().err
    args = build_parser().parse_args(["eval", "--instances", "i", "--images", "m", "--out", "o",
                                      "--max-targets-per-backward", "16"])
    assert args.max_targets_per_backward == 16
    # memory only: changing it does not stop a run from resuming
    config = EvalConfig(instances="i", images="m", out="o", max_targets_per_backward=16)
    assert config.identity() == EvalConfig(instances="i", images="m", out="o").identity()


def test_eval_run_passes_the_chunk_size_to_every_explain(tmp_path, monkeypatch):
    from mmgradcam.eval.pipeline import run_eval
    from tiny import tiny_eval_config

    config = tiny_eval_config(tmp_path, 2, max_targets_per_backward=1)
    calls = count_batched_backwards(monkeypatch)
    asked = []
    real = vqa.VQAModel.explain

    def recording(self, *args, **kwargs):
        asked.append(kwargs.get("max_targets_per_backward"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(vqa.VQAModel, "explain", recording)
    run_eval(config, progress=False)
    assert calls and set(calls) == {1}  # the caption words' backwards (one VQA answer needs no batch)
    assert asked and set(asked) == {1}
