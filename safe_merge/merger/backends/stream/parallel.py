"""--workers N: the stream backend's output shards merged by N processes at once. An output shard depends only on
the base's tensors it holds and the adapter's slices for them, so each worker opens the base and the adapter
itself (from disk: nothing large crosses a process boundary), merges, writes and checks its shards as written
into the shared staging directory, and returns what it checked. The coordinator unions those results, then
writes the index, config and tokenizer and runs the checks over the whole checkpoint, as with one process.

Workers are fresh interpreters (``python -m`` this module: no threads or locks inherited, nothing shared but
files), each with its share of the cores for torch; a task goes in as a file and the result (or what the
worker raised) comes back as one, its output is kept aside and shown only when it dies without a result. A
failure or signal in the coordinator terminates them; the staging directory goes with it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import tempfile
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
    device: str
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
    with tempfile.TemporaryDirectory(prefix="safe-merge-workers-") as tmp:
        started: list[tuple[subprocess.Popen, Path, Path]] = []
        try:
            for i, files in enumerate(plan):
                task, result, log = (Path(tmp) / f"{i}.{kind}" for kind in ("task", "result", "log"))
                task.write_bytes(pickle.dumps((inputs, out, {f: declared[f] for f in files})))
                with open(log, "wb") as err:
                    command = [sys.executable, "-m", __name__, str(task), str(result)]
                    started.append(
                        (subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=err, stderr=err), result, log)
                    )
            return [_collect(process, result, log) for process, result, log in started]
        finally:
            for process, _, _ in started:  # a failure or signal here: the others stop too
                if process.poll() is None:
                    process.terminate()
            for process, _, _ in started:
                process.wait()


def run_on_ray(
    inputs: Inputs, out: Path, declared: dict[str, list[Slot]], workers: int | None, address: str
) -> list[Done]:
    """The same shares as ``run``, as Ray tasks: on a running cluster (``address``) or one started here and
    stopped after (``local``). ``out`` must be on a filesystem every node sees (the inputs too)."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        local = address == "local"
        ray.init(
            address=None if local else address,
            num_cpus=os.cpu_count() if local else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    refs = []
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = workers or cpus
        task = ray.remote(num_cpus=max(1, min(inputs.threads, cpus)), max_retries=0)(_work)
        refs = [task.remote(inputs, out, {f: declared[f] for f in files}) for files in balance(declared, count)]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:  # what the task raised, as itself
            raise exc.as_instanceof_cause() from None
    finally:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _ray():
    try:
        import ray
    except ImportError:
        from safe_merge.errors import BadInput

        raise BadInput("--ray needs Ray, which is not installed", hint="pip install 'safe-merge[ray]'") from None
    return ray


def _collect(process: subprocess.Popen, result: Path, log: Path) -> Done:
    """A worker's result, or what it raised (re-raised here), or its exit and its last words."""
    process.wait()
    if result.is_file():
        status, value = pickle.loads(result.read_bytes())
        if status == "error":
            raise value
        return value
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
    raise RuntimeError(f"a merge worker exited with {process.returncode} before finishing: {' | '.join(tail)}")


def _work(inputs: Inputs, out: Path, declared: dict[str, list[Slot]]) -> Done:
    """In a worker: open the merge as the coordinator did, write these shards, check them as written."""
    from safe_merge.compat.adapter_files import load_adapter
    from safe_merge.merger.backends.stream import verify, write

    torch.set_num_threads(inputs.threads)
    adapter = load_adapter(inputs.adapter_dir, mapped=True)
    prep = write.prepare(
        inputs.base_dir, adapter, inputs.dtype, inputs.factor_dtype, inputs.rounding, inputs.policy, inputs.device
    )
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


def _main(task: str, result: str) -> None:
    """A worker process: the task from its file, the result (or the exception) into another."""
    try:
        value = ("done", _work(*pickle.loads(Path(task).read_bytes())))
    except BaseException as exc:  # handed to the coordinator, which raises it
        value = ("error", exc)
    Path(result).write_bytes(pickle.dumps(value))


if __name__ == "__main__":  # run as a script its classes would be __main__'s: use the module's own
    from safe_merge.merger.backends.stream import parallel

    parallel._main(*sys.argv[1:3])
