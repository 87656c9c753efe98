"""torch.distributed when started under torchrun (NCCL with one GPU per rank when the run's device
is CUDA, gloo on CPU); a single process otherwise."""
from __future__ import annotations

import datetime
import os
import warnings

import torch

# the device setup() chose for this process (None until it runs)
_device: torch.device | None = None


def _gpu_shortage(local_rank: int | None, local_world: int | None) -> str | None:
    """Why the ranks of this node cannot each have their own GPU (None: they can)."""
    if local_rank is None:
        return "LOCAL_RANK is not set: start the processes with torchrun to use one GPU per rank"
    count = torch.cuda.device_count()
    # LOCAL_WORLD_SIZE (torchrun) makes every rank of the node decide alike: a mix of NCCL and gloo
    # ranks would hang at the first collective
    needed = max(local_rank + 1, local_world or 0)
    if needed > count:
        return (f"{needed} processes on this node (LOCAL_RANK={local_rank}) but {count} GPU(s) are visible: "
                f"start at most {count} per node (torchrun --nproc_per_node)")
    return None


def select_backend(device: str | torch.device | None = None, world: int = 1, local_rank: int | None = None,
                   local_world: int | None = None) -> tuple[str, torch.device]:
    """(backend, device) for one process of a ``world``-process run: ("nccl", cuda:``local_rank``)
    when the run's device is CUDA, ("gloo", the device) otherwise. ``device`` None or "auto" means
    CUDA when it is available and each of the node's ``local_world`` ranks can have its own GPU
    (else gloo on CPU, with a warning); an explicit "cuda" that cannot be met is an error. Touches
    no GPU (safe to call to test the choice)."""
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return "gloo", torch.device("cpu")
        shortage = _gpu_shortage(local_rank, local_world) if world > 1 else None
        if shortage is not None:
            warnings.warn(f"{shortage}; using gloo on the CPU", stacklevel=3)
            return "gloo", torch.device("cpu")
        device = "cuda"
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'auto', 'cuda', 'cpu')") from error
    if chosen.type != "cuda":
        return "gloo", chosen
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if world <= 1:
        return "nccl", chosen
    if chosen.index is not None:
        # each rank owns one GPU, chosen by torchrun's LOCAL_RANK, so a fixed index would be shared
        raise ValueError(f"device {device!r}: under torchrun give 'cuda' or 'auto'; each rank takes GPU LOCAL_RANK")
    shortage = _gpu_shortage(local_rank, local_world)
    if shortage is not None:
        raise ValueError(f"device {device!r}: {shortage}")
    return "nccl", torch.device("cuda", local_rank)


def setup(device: str | torch.device | None = None) -> tuple[int, int]:
    """(rank, world size); initializes the process group when WORLD_SIZE > 1 (NCCL on the rank's
    local GPU when the run's device is CUDA, gloo otherwise). ``local_device()`` then says which
    device this process must use."""
    global _device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank, local_world = (os.environ.get(k) for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    backend, _device = select_backend(device, world, None if local_rank is None else int(local_rank),
                                      None if local_world is None else int(local_world))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    options: dict = {}
    if backend == "nccl":
        # NCCL works on the current GPU: setting it (and binding the group to it) lets barrier() and
        # object collectives use this rank's GPU instead of every rank piling onto GPU 0
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        options["device_id"] = _device
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=12), **options)
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """The device this process must use, as chosen by ``setup()``."""
    if _device is None:
        raise RuntimeError("distributed.setup() has not run in this process: no device is chosen yet")
    return _device


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        # with NCCL the barrier runs on this rank's GPU (set by setup()); gloo ignores device_ids
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def teardown(world: int) -> None:
    global _device
    _device = None
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
