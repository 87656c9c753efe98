"""What the training scripts share: images in memory, a resumable checkpointed loop, the schedule."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from mmgradcam.data.shapes import ensure_split
from mmgradcam.tasks import checkpoints
from mmgradcam.tasks.geometry import to_tensor


def common_arguments(parser, out: str, steps: int) -> None:
    """The options both training scripts take."""
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for the forward (fast only on CPUs with bf16 instructions: "
                             "on AVX2-only CPUs it is about 10x slower than the float32 default)")
    parser.add_argument("--encoder", type=json.loads, default=None,
                        help='trunk spec as JSON, e.g. \'{"stem": 4, "stem_width": 32, "stages": [[64, 2, 1], '
                             '[128, 2, 2]]}\' (stages: [width, blocks, stride])')
    parser.add_argument("--ship", action="store_true", help="copy the result into the package (tasks/weights)")


def prepare_splits(args, bias: dict[str, str] | None = None) -> list[str]:
    """Seed everything and write the train/val/test splits if missing; returns the eval splits."""
    import random

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    ensure_split(args.data, "train", args.num_train, seed=args.seed, bias=bias)
    ensure_split(args.data, "val", args.num_val, seed=args.seed)
    if args.num_test:
        ensure_split(args.data, "test", args.num_test, seed=args.seed)
    return ["val"] + (["test"] if args.num_test else [])


def finish(model: nn.Module, config: dict, report: dict, args, shipped_name: str) -> None:
    """Save the model (safetensors + config) and the report; with --ship, copy both into the package."""
    import shutil

    final = checkpoints.save_model(model, config, args.out / "model")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    log_line(args.out, json.dumps(report))
    print(json.dumps({k: {m: v for m, v in r.items() if m != "examples"} for k, r in report.items()}))
    if args.ship:
        target = checkpoints.packaged(shipped_name)
        target.mkdir(parents=True, exist_ok=True)
        for name in (checkpoints.WEIGHTS, checkpoints.CONFIG):
            shutil.copy(final / name, target / name)
        (target / "report.json").write_text(json.dumps(report, indent=1))
        print(f"shipped to {target}")


def load_images(split: dict) -> tuple[torch.Tensor, list[int]]:
    """All images of a split as one normalized float tensor (N, 3, H, W), in instances order."""
    ids = [img["id"] for img in split["instances"]["images"]]
    files = {img["id"]: img["file_name"] for img in split["instances"]["images"]}
    pixels = torch.cat([to_tensor(Image.open(split["images_dir"] / files[i]).convert("RGB")) for i in ids])
    return pixels, ids


def train_loop(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
               num_items: int, *, steps: int, batch_size: int, lr: float, out: Path, seed: int,
               checkpoint_every: int = 100, bf16: bool = False) -> None:
    """AdamW with warm-up and cosine decay over ``steps``; ``loss_fn(batch_indices, generator)``.

    ``bf16`` runs the forward under CPU bfloat16 autocast (weights and optimizer stay float32).
    It pays only where the CPU has bf16 instructions (AVX-512 BF16, AMX): on this project's AVX2
    machine a captioner step took 10.5 s under autocast against 0.9 s in float32.

    A checkpoint (tensors only, read back with weights_only=True) is written every
    ``checkpoint_every`` steps with the batch order and random state; a rerun with the same
    arguments resumes from it and ends where an uninterrupted run would.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    generator = torch.Generator().manual_seed(seed)
    step = 0
    order = torch.randperm(num_items, generator=generator)
    position = 0
    with (out / "train.log").open("a") as log:
        if checkpoint_path.is_file():
            state = torch.load(checkpoint_path, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            step, order, position = int(state["step"]), state["order"], int(state["position"])
            print(f"resumed from step {step}", file=log, flush=True)
        model.train()
        start = time.time()
        while step < steps:
            if position + batch_size > num_items:
                order, position = torch.randperm(num_items, generator=generator), 0
            batch = order[position:position + batch_size]
            position += batch_size
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(batch, generator).float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 20 == 0 or step == steps:
                print(f"step {step}/{steps} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e} "
                      f"{time.time() - start:.0f}s", file=log, flush=True)
            if step % checkpoint_every == 0 or step == steps:
                tmp = checkpoint_path.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "generator": generator.get_state(),
                            "step": step, "order": order, "position": position}, tmp)
                tmp.replace(checkpoint_path)
    model.eval()


def log_line(out: Path, text: str) -> None:
    with (out / "train.log").open("a") as log:
        print(text, file=log, flush=True)
