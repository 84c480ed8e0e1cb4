"""--workers N: the stream backend's output shards merged by N processes at once. An output shard depends only on
the base's tensors it holds and the adapter's slices for them, so each worker opens the base and the adapter
itself (from disk: nothing large crosses a process boundary), merges, writes and checks its shards as written
into the shared staging directory, and returns what it checked. The coordinator unions those results, then
writes the index, config and tokenizer and runs the checks over the whole checkpoint, as with one process.

Workers are fresh interpreters (spawn: no threads or locks inherited), each with its share of the cores for
torch. A failure or signal in the coordinator terminates them; the staging directory goes with it.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safe_merge.io.shards import Slot

AUTO_MIN_BYTES = 2**30  # below about a GiB of output, starting a worker costs more than it saves
WORKER_OVERHEAD = 600 * 2**20  # an interpreter with torch, transformers and PEFT imported (measured: ~550 MiB)


@dataclass(frozen=True)
class Inputs:
    """What a worker needs to open the merge itself."""

    base_dir: Path
    adapter_dir: Path
    dtype: torch.dtype
    factor_dtype: torch.dtype
    rounding: str
    policy: str
    check: bool
    threads: int


@dataclass
class Done:
    """One worker's shards: the files, its counts and seconds, and the tensors it checked as written."""

    files: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    results: list = field(default_factory=list)  # TensorResult
    seen: set[str] = field(default_factory=set)


def balance(declared: dict[str, list[Slot]], workers: int) -> list[list[str]]:
    """Shard files dealt to workers, largest first to the least loaded (bytes), each worker's in file order."""
    loads = [[0, []] for _ in range(min(workers, len(declared)))]
    for name in sorted(declared, key=lambda n: -sum(s.nbytes for s in declared[n])):
        target = min(loads, key=lambda load: load[0])
        target[0] += sum(s.nbytes for s in declared[name])
        target[1].append(name)
    order = list(declared)
    return [sorted(files, key=order.index) for _, files in loads if files]


def choose_workers(requested: int | None, shards: int, total_bytes: int, peak: int, free: int) -> int:
    """--workers N as given (at most one per shard); auto: one per core while memory allows (each worker holds
    its own buffers, ``peak``, and an interpreter), one for small outputs."""
    if requested is not None:
        return max(1, min(requested, shards))
    if total_bytes < AUTO_MIN_BYTES:
        return 1
    by_memory = max(1, free // max(1, peak + WORKER_OVERHEAD))
    return max(1, min(os.cpu_count() or 1, shards, by_memory))


def run(inputs: Inputs, out: Path, declared: dict[str, list[Slot]], workers: int) -> list[Done]:
    """Each worker's share of ``declared`` merged and written into ``out``; raises what a worker raised."""
    plan = balance(declared, workers)
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(processes=len(plan))
    try:
        pending = [pool.apply_async(_work, (inputs, out, {f: declared[f] for f in files})) for files in plan]
        done = [p.get() for p in pending]
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return done


def _work(inputs: Inputs, out: Path, declared: dict[str, list[Slot]]) -> Done:
    """In a worker: open the merge as the coordinator did, write these shards, check them as written."""
    from safe_merge.compat.adapter_files import load_adapter
    from safe_merge.merger.backends.stream import verify, write

    torch.set_num_threads(inputs.threads)
    adapter = load_adapter(inputs.adapter_dir, mapped=True)
    prep = write.prepare(inputs.base_dir, adapter, inputs.dtype, inputs.factor_dtype, inputs.rounding, inputs.policy)
    checks = verify.TensorChecks(prep) if inputs.check else None
    written = write.Written([])
    write.write_shards(prep, out, declared, written, checks)
    return Done(
        sorted(declared),
        written.counts,
        written.seconds,
        checks.results.tensors if checks else [],
        checks.seen if checks else set(),
    )
