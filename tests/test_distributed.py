"""The eval's process-group setup: NCCL with one GPU per rank when the run's device is CUDA, gloo
on CPU. CUDA is faked (torch.cuda.is_available monkeypatched) and no process group is started:
the torchrun test in test_eval_pipeline.py runs the real thing with 2 CPU processes."""
import pytest
import torch
import torch.distributed as dist

from mmgradcam.eval import distributed
from mmgradcam.eval.distributed import select_backend


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs (0: none)."""
    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return fake


def test_auto_picks_nccl_on_the_local_gpu_when_cuda_is_available(gpus):
    gpus(2)
    assert select_backend(None, world=2, local_rank=1) == ("nccl", torch.device("cuda", 1))
    assert select_backend("auto", world=2, local_rank=0) == ("nccl", torch.device("cuda", 0))
    assert select_backend("cuda", world=2, local_rank=1) == ("nccl", torch.device("cuda", 1))
    assert select_backend("auto", world=1) == ("nccl", torch.device("cuda"))  # one process: no group


def test_gloo_on_cpu(gpus):
    gpus(0)
    assert select_backend(None, world=2, local_rank=1) == ("gloo", torch.device("cpu"))
    gpus(2)
    assert select_backend("cpu", world=2, local_rank=1) == ("gloo", torch.device("cpu"))  # asked for CPU


def test_bad_device_requests_are_named(gpus):
    gpus(0)
    with pytest.raises(ValueError, match="'cuda': CUDA is not available"):
        select_backend("cuda", world=2, local_rank=0)
    with pytest.raises(ValueError, match="'gpu please' is not a torch device"):
        select_backend("gpu please")
    gpus(2)
    with pytest.raises(ValueError, match="'cuda:1': under torchrun give 'cuda' or 'auto'"):
        select_backend("cuda:1", world=2, local_rank=0)
    with pytest.raises(ValueError, match=r"'cuda': 3 processes on this node \(LOCAL_RANK=2\) but 2 GPU"):
        select_backend("cuda", world=3, local_rank=2)
    with pytest.raises(ValueError, match="'cuda': LOCAL_RANK is not set"):
        select_backend("cuda", world=2, local_rank=None)


def test_auto_falls_back_to_gloo_alike_on_every_rank_when_gpus_are_short(gpus):
    """Three ranks on a node with two GPUs: rank 0 and 1 must not pick NCCL while rank 2 picks
    gloo (the first collective would hang), so LOCAL_WORLD_SIZE decides for all."""
    gpus(2)
    for rank in range(3):
        with pytest.warns(UserWarning, match="3 processes on this node .* using gloo on the CPU"):
            assert select_backend(None, world=3, local_rank=rank, local_world=3) == ("gloo", torch.device("cpu"))
    with pytest.warns(UserWarning, match="LOCAL_RANK is not set"):
        assert select_backend("auto", world=2, local_rank=None) == ("gloo", torch.device("cpu"))
    assert select_backend(None, world=2, local_rank=1, local_world=2) == ("nccl", torch.device("cuda", 1))


@pytest.fixture
def fake_group(monkeypatch):
    """Record init_process_group and set_device instead of starting anything."""
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(set_device=d))
    yield calls
    distributed.teardown(1)  # world 1: forgets the device, touches no process group


def test_setup_binds_each_rank_to_its_gpu_with_nccl(gpus, fake_group):
    gpus(2)
    assert distributed.setup() == (1, 2)
    assert fake_group["backend"] == "nccl" and fake_group["set_device"] == 1
    assert fake_group["device_id"] == torch.device("cuda", 1)
    assert distributed.local_device() == torch.device("cuda", 1)


def test_setup_uses_gloo_without_cuda(gpus, fake_group):
    gpus(0)
    assert distributed.setup("auto") == (1, 2)
    assert fake_group["backend"] == "gloo" and "set_device" not in fake_group and "device_id" not in fake_group
    assert distributed.local_device() == torch.device("cpu")


def test_single_process_and_local_device_before_setup(monkeypatch, gpus):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    gpus(0)
    distributed.teardown(1)
    with pytest.raises(RuntimeError, match="setup\\(\\) has not run"):
        distributed.local_device()
    assert distributed.setup() == (0, 1)
    assert distributed.local_device() == torch.device("cpu")
    distributed.teardown(1)
