"""Peak memory of one forward and the batched backward of T word targets, unchunked and chunked.

    python scripts/bench_memory.py                          # CPU, T = 1 4 16 64, chunks: all, 8
    python scripts/bench_memory.py --targets 4 16 --chunks all 4 --layer 6
    python scripts/bench_memory.py --device cuda            # peak from torch.cuda.max_memory_allocated

The model: a randomly initialised GPT-2-style decoder (transformers ``GPT2LMHeadModel``, 12 layers,
768 wide, a 2048-word head by default) reading a 576-token image prefix (random "image features", as a LLaVA-style
projector would give) followed by T caption words, all through ``inputs_embeds``. Target t is word
t's log-probability at the position that predicts it (as the captioning adapters score words); the
explained layer is block ``--layer``'s hidden states (the engine's ``forward_and_gradients``, the
path ``mg.explain`` takes). "all" puts the T targets in one batched backward; a number k is
``max_targets_per_backward=k`` (ceil(T / k) backwards over the same forward graph).

Every configuration runs in a fresh subprocess so that no allocator cache carries over. Peak memory:
- CPU: after the model and inputs are built, the process's resident-set high-water mark is reset
  (``/proc/self/clear_refs`` <- "5", Linux); the peak is VmHWM after the run minus VmRSS before it.
  Where the reset is not allowed, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the run minus
  the resident set before it is used instead (then a higher peak while loading can hide a smaller one).
- CUDA: ``torch.cuda.reset_peak_memory_stats`` after loading; the peak is
  ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before the run.
Seconds: wall time of the forward and the backward(s), one run (no warm-up; the timing is a rough
guide, the memory the point).
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MiB = 2 ** 20


def status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class WordLogProb:
    """Target: log-probability of ``word`` at ``position`` (the logits that predict it)."""

    def __init__(self, position: int, word: int):
        self.position, self.word = position, word

    def __call__(self, output):
        import torch

        return torch.log_softmax(output.logits[:, self.position].float(), dim=-1)[:, self.word]


def measure(args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmgradcam.engine import forward_and_gradients

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    count, chunk = args.count, None if args.chunk == "all" else int(args.chunk)
    config = GPT2Config(n_layer=args.layers, n_embd=args.dim, n_head=args.heads, vocab_size=args.vocab,
                        n_positions=args.prefix + count + 1, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval().to(device)
    with torch.no_grad():
        words = torch.randint(args.vocab, (1, count), device=device)
        image = torch.randn(1, args.prefix, args.dim, device=device)
        embeds = torch.cat([image, model.transformer.wte(words)], dim=1)
    # word t is predicted by the logits at the position just before it
    targets = [WordLogProb(args.prefix + t - 1, int(words[0, t])) for t in range(count)]
    name = f"transformer.h.{args.layer}"
    layer = model.get_submodule(name)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        source = "torch.cuda.max_memory_allocated"
    else:
        before = (status_kib("VmRSS") or 0) * 1024
        source = "VmHWM after clear_refs" if reset_cpu_peak() else "ru_maxrss"
    start = time.perf_counter()
    _, gradients, _ = forward_and_gradients(model, {"inputs_embeds": embeds}, targets, [(name, layer)],
                                            max_targets_per_backward=count if chunk is None else chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    elif source == "ru_maxrss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    else:
        peak = (status_kib("VmHWM") or 0) * 1024 - before
    assert gradients[0].shape[0] == count
    return {"targets": count, "chunk": args.chunk, "peak_mib": peak / MiB, "seconds": seconds, "source": source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--chunks", nargs="+", default=["all", "8"], help="'all' (one backward) or a number")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=2048,
                        help="LM-head size (GPT-2's 50257 makes the logits' gradient dominate and a CPU run slow)")
    parser.add_argument("--prefix", type=int, default=576, help="image tokens before the words")
    parser.add_argument("--layer", type=int, default=10, help="explained block (its hidden states)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    for chunk in args.chunks:
        if chunk != "all" and not (chunk.isdigit() and int(chunk) > 0):
            parser.error(f"--chunks takes 'all' or positive numbers, got {chunk!r}")
    shared = [f"--{k}={getattr(args, k)}" for k in ("device", "layers", "dim", "heads", "vocab", "prefix", "layer",
                                                    "threads")]
    print(f"GPT2LMHeadModel (random weights): {args.layers} layers, {args.dim} wide, vocab {args.vocab}, "
          f"{args.prefix} image tokens + T words; explaining transformer.h.{args.layer}; device {args.device}, "
          f"{args.threads} thread(s); one fresh process per row\n")
    print("| T | targets per backward | backwards | peak MiB | seconds |")
    print("|---:|---:|---:|---:|---:|")
    source = None
    for count in args.targets:
        for chunk in args.chunks:
            child = subprocess.run([sys.executable, __file__, "--child", f"--count={count}", f"--chunk={chunk}",
                                    *shared], capture_output=True, text=True)
            if child.returncode != 0:
                print(f"| {count} | {chunk} | failed: {child.stderr.strip().splitlines()[-1]} | | |")
                continue
            row = json.loads(child.stdout.strip().splitlines()[-1])
            source = row["source"]
            backwards = 1 if chunk == "all" else -(-count // int(chunk))
            print(f"| {count} | {chunk} | {backwards} | {row['peak_mib']:.0f} | {row['seconds']:.1f} |", flush=True)
    if source is not None:
        print(f"\npeak memory above the loaded model and inputs, from {source}")


if __name__ == "__main__":
    main()
