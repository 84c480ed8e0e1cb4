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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safe_merge.io.shards import Slot

AUTO_MIN_BYTES = 2**30  # below about a GiB of output, starting a worker costs more than it saves
# auto gives each worker this many cores: one process already runs its matrix products on every core it has, and
# on 2 cores two workers were no faster than one (bench/stream.py); workers pay where cores outnumber that
CORES_PER_WORKER = 4
POLL_SECONDS = 0.05
RAY_START_SECONDS = 180  # a worker of a fresh cluster imports Ray in a few seconds; far longer means it cannot start
RAY_TEMP = "/tmp/ray"  # Ray's own default, where TMPDIR would put its sockets inside the virtualenv
WORKER_OVERHEAD = 300 * 2**20  # an interpreter: 219 MiB with torch alone (the bench's floor run), and the rest


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


def choose_workers(
    requested: int | None, shards: int, total_bytes: int, peak: int, free: int, cores: int | None = None
) -> int:
    """--workers N as given (at most one per shard); auto: one per CORES_PER_WORKER cores while memory allows
    (each worker holds its own buffers, ``peak``, and an interpreter), one for small outputs."""
    if requested is not None:
        return max(1, min(requested, shards))
    if total_bytes < AUTO_MIN_BYTES:
        return 1
    by_memory = max(1, free // max(1, peak + WORKER_OVERHEAD))
    by_cores = max(1, (cores or os.cpu_count() or 1) // CORES_PER_WORKER)
    return max(1, min(by_cores, shards, by_memory))


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
                    worker = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=_env())
                    started.append((worker, result, log))
            done: dict[int, Done] = {}
            while len(done) < len(started):  # the first failure is raised at once; the others are stopped below
                for i, (process, result, log) in enumerate(started):
                    if i not in done and process.poll() is not None:
                        done[i] = _collect(process, result, log)
                time.sleep(POLL_SECONDS)
            return [done[i] for i in range(len(started))]
        finally:
            for process, _, _ in started:  # a failure or signal here: the others stop too
                if process.poll() is None:
                    process.terminate()
            for process, _, _ in started:
                process.wait()


def _env() -> dict[str, str]:
    """The coordinator's environment, with the directory safe_merge was imported from first on the path."""
    package = str(Path(__file__).resolve().parents[4])
    paths = [package, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def run_on_ray(
    inputs: Inputs, out: Path, declared: dict[str, list[Slot]], workers: int | None, address: str
) -> list[Done]:
    """The same shares as ``run``, as Ray tasks: on a running cluster (``address``) or one started here and
    stopped after (``local``). ``out`` must be on a filesystem every node sees (the inputs too)."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        local = address == "local"
        options = {}
        temp = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()).resolve()
        if local and Path(sys.prefix).resolve() in (temp, *temp.parents):
            options["_temp_dir"] = RAY_TEMP  # Ray's workers refuse a temporary directory inside the virtualenv
        ray.init(
            address=None if local else address,
            num_cpus=os.cpu_count() if local else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            **options,
        )
    refs, finished = [], False
    try:
        _probe(ray)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = workers or cpus
        task = ray.remote(num_cpus=max(1, min(inputs.threads, cpus)), max_retries=0)(_work)
        refs = [task.remote(inputs, out, {f: declared[f] for f in files}) for files in balance(declared, count)]
        try:
            done = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:  # what the task raised, as itself
            raise exc.as_instanceof_cause() from None
        finished = True
        return done
    finally:
        if refs and not finished:  # only tasks still running: cancelling a finished one crashed Ray 2.60's driver
            _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in running:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _probe(ray) -> None:
    """One empty task: a cluster whose workers cannot start says so instead of waiting for ever."""
    try:
        ray.get(ray.remote(_alive).remote(), timeout=RAY_START_SECONDS)
    except ray.exceptions.GetTimeoutError:
        from safe_merge.errors import BadInput

        raise BadInput(
            f"Ray started no worker within {RAY_START_SECONDS} s",
            hint="see the Ray session's logs (raylet.err); with --ray local, is the temporary directory usable?",
        ) from None


def _alive() -> bool:
    return True


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
