"""Shard files and resume: what a run has written, what is finished, and the merged results.

Work is cut into fixed batches of images. Each batch's result lines are appended to its process's
shard file (``shards/rankNNN.jsonl``) followed by a ``batch_done`` marker, then flushed and
fsynced: a batch without its marker was cut off by a kill and is dropped (and cut off the file) on
resume. ``run.json`` holds the arguments a run was started with, so a rerun resumes only the same
run. Batches being fixed, a resumed run ends with exactly the results of an uninterrupted one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

RESULTS = "results.jsonl"
SHARDS = "shards"
RUN_FILE = "run.json"


def shard_path(out: Path, rank: int) -> Path:
    return out / SHARDS / f"rank{rank:03d}.jsonl"


def read_complete_batches(path: Path, truncate: bool = False) -> dict[int, list[dict]]:
    """Lines of every batch that reached its ``batch_done`` marker; optionally cut the rest off."""
    done: dict[int, list[dict]] = {}
    if not path.is_file():
        return done
    pending: list[dict] = []
    good_bytes = 0
    offset = 0
    with path.open("rb") as handle:
        for raw in handle:
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # a line cut off by a kill
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                break
            if line.get("kind") == "batch_done":
                done[int(line["batch"])] = pending
                pending = []
                good_bytes = offset
            else:
                pending.append(line)
    if truncate and good_bytes < path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return done


def all_complete_batches(out: Path) -> dict[int, list[dict]]:
    """Finished batches of every shard (a batch finished twice, by two runs, counts once)."""
    merged: dict[int, list[dict]] = {}
    for shard in sorted((out / SHARDS).glob("rank*.jsonl")):
        for batch, lines in read_complete_batches(shard).items():
            merged.setdefault(batch, lines)
    return merged


def append_batch(path: Path, lines: list[dict], batch: int) -> None:
    """Append one batch's lines and its ``batch_done`` marker in one write, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    text += json.dumps({"kind": "batch_done", "batch": batch}) + "\n"
    with path.open("a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def check_run_file(out: Path, identity: dict, write: bool) -> None:
    """Refuse to resume a run started with other arguments; ``write`` (rank 0) records a new run's."""
    run_file = out / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != identity:
            changed = sorted(k for k in identity if previous.get(k) != identity[k])
            raise ValueError(f"--out {str(out)!r} holds a run with other arguments ({', '.join(changed)}); "
                             "use a new --out or the same arguments to resume")
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(identity, indent=1))
        tmp.replace(run_file)


def resume(out: Path, rank: int, world: int, batches: int) -> tuple[Path, list[int]]:
    """This rank's shard (its torn tail cut off) and its batches still to do (k % world == rank)."""
    shard = shard_path(out, rank)
    read_complete_batches(shard, truncate=True)
    finished = set(all_complete_batches(out))
    return shard, [k for k in range(batches) if k % world == rank and k not in finished]


def merged_lines(out: Path) -> Iterator[dict]:
    """Every finished batch's lines, in batch order (whatever process wrote them)."""
    complete = all_complete_batches(out)
    for k in sorted(complete):
        yield from complete[k]


def write_results(out: Path, lines: list[dict]) -> None:
    """results.jsonl: the scored words and answers (not skips or markers), atomically replaced."""
    results = out / RESULTS
    tmp = results.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for line in lines:
            if line["kind"] in ("word", "answer"):
                handle.write(json.dumps(line) + "\n")
    tmp.replace(results)
