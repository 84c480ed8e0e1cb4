"""Nothing lost, ever: every writing command refuses an output that would touch an input, every signal ends with a
clear line, its exit code and no stray file, a killed run is cleaned up by the next, damaged headers are refused,
and a full disk says how much room the merge needs. Inputs are hashed before and after every case."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safe_merge.io import staging
from tests.helpers import digest, small_pair

TRACEBACK = "Traceback"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    return small_pair(tmp_path_factory.mktemp("inputs"))


@pytest.fixture
def inputs(models, tmp_path) -> tuple[Path, Path]:
    """A private copy of the base and the adapter side by side in tmp_path/models (tests may try to destroy it)."""
    base, adapter = tmp_path / "models" / "base", tmp_path / "models" / "adapter"
    shutil.copytree(models[0], base)
    shutil.copytree(models[1], adapter)
    return base, adapter


def _refused(cli, inputs: tuple[Path, ...], *args, needle: str) -> str:
    before = digest(*inputs)
    code, _, err = cli(*args)
    assert code == 2, err
    assert needle in err and TRACEBACK not in err, err
    assert digest(*inputs) == before, "an input was modified"
    return err


@pytest.mark.parametrize(
    ("out", "needle"),
    [
        ("models/base", "is the base model"),
        ("models/adapter", "is the adapter"),
        ("models", "holds the base model"),
        ("models/base/merged", "is inside the base model"),
    ],
)
def test_merge_never_writes_over_into_or_above_an_input_even_with_force(cli, inputs, tmp_path, out, needle):
    err = _refused(cli, inputs, "merge", *inputs, "-o", tmp_path / out, "--force", needle=needle)
    assert "refused by rule: output-path" in err


def test_merge_into_the_current_directory_holding_the_inputs_is_refused(cli, inputs, monkeypatch):
    monkeypatch.chdir(inputs[0].parent)
    _refused(cli, inputs, "merge", "base", "adapter", "-o", ".", "--force", needle="holds the base model")


def test_report_into_an_input_is_refused_before_any_work(cli, inputs, tmp_path):
    _refused(
        cli,
        inputs,
        "merge",
        *inputs,
        "-o",
        tmp_path / "out",
        "--report",
        inputs[0] / "config.json",
        "--force",
        needle="--report is inside the base model",
    )
    assert not (tmp_path / "out").exists()


def test_migrate_onto_its_own_input_is_refused(cli, inputs):
    _refused(cli, inputs, "migrate", inputs[1], "-o", inputs[1], "--force", needle="is the adapter")


def test_fingerprint_inside_an_input_is_refused(cli, inputs):
    _refused(cli, inputs, "fingerprint", *inputs, "-o", inputs[1] / "fp.json", needle="is inside the adapter")


def test_demo_never_writes_into_an_existing_directory_without_force(cli, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    code, _, err = cli("demo", "-o", keep)
    assert code == 2 and "already exists" in err
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]


def test_a_report_that_cannot_be_written_stops_the_publish_and_a_retry_succeeds(cli, inputs, tmp_path, monkeypatch):
    out, report_path = tmp_path / "out", tmp_path / "reports" / "report.json"

    def read_only(path, *args):
        path.parent.mkdir(parents=True, exist_ok=True)  # as far as a read-only mount would let it get
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(staging, "_stage_side_file", read_only)  # the report's filesystem refuses the write
        code, _, err = cli("merge", *inputs, "-o", out, "--report", report_path)
    assert code == 2 and "nothing was written" in err and "report.json" in err and TRACEBACK not in err, err
    assert _leftovers(tmp_path) == [], "OUT or a temporary was left although the report was not written"
    code, _, err = cli("merge", *inputs, "-o", out, "--report", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["status"] == "passed" and report["exit_code"] == 0 and report["output"]["path"] == str(out)


def test_a_report_under_a_file_is_refused_before_any_work(cli, inputs, tmp_path):
    (tmp_path / "blocker").write_text("a file, not a directory")
    code, _, err = cli("merge", *inputs, "-o", tmp_path / "out", "--report", tmp_path / "blocker" / "report.json")
    assert code == 2 and "which is a file" in err and "refused by rule: output-path" in err, err
    assert _leftovers(tmp_path) == ["blocker"]


def test_a_report_inside_out_is_published_with_it(cli, inputs, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli("merge", *inputs, "-o", out, "--report", out / "safe-merge-report.json")
    assert code == 0, err
    assert json.loads((out / "safe-merge-report.json").read_text())["status"] == "passed"


def test_out_has_the_permissions_the_umask_gives(cli, inputs, tmp_path):
    previous = os.umask(0o027)
    try:
        code, _, err = cli("merge", *inputs, "-o", tmp_path / "out")
    finally:
        os.umask(previous)
    assert code == 0, err
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o640


# --- signals, with real processes ---------------------------------------------------------------------------------


def _start_merge(inputs, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "safe_merge", "merge", *map(str, inputs), "-o", str(out), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stop_when_staging(process: subprocess.Popen, parent: Path, timeout: float = 120.0, kind: str = "staging") -> None:
    """Freeze the process (SIGSTOP) the moment its staging dir (or another temporary ``kind``) appears: the signal
    under test then arrives while the model is being written or verified, whatever the machine's speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(f".safe-merge-{kind}-" in name for name in os.listdir(parent)):
            process.send_signal(signal.SIGSTOP)
            return
        if process.poll() is not None:
            pytest.fail(f"the merge ended before staging: {process.communicate()}")
        time.sleep(0.001)
    process.kill()
    pytest.fail("no staging dir appeared")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != "models")


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize(
    ("signals", "code", "name"),
    [
        ((signal.SIGTERM,), 143, "SIGTERM"),
        ((signal.SIGHUP,), 129, "SIGHUP"),
        ((signal.SIGINT,), 130, "SIGINT"),
        ((signal.SIGINT, signal.SIGINT), 130, "SIGINT"),
    ],
    ids=["sigterm", "sighup", "sigint", "ctrl-c-twice"],
)
def test_a_signal_during_the_write_removes_staging_and_says_so_in_one_line(inputs, tmp_path, signals, code, name):
    before = digest(*inputs)
    process = _start_merge(inputs, tmp_path / "out")
    _stop_when_staging(process, tmp_path)
    process.send_signal(signals[0])
    process.send_signal(signal.SIGCONT)
    for again in signals[1:]:
        time.sleep(0.002)
        process.send_signal(again)  # while the first one's cleanup runs
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert TRACEBACK not in err and f"interrupted by {name}; nothing was written" in err, err
    assert _leftovers(tmp_path) == [], "staging or scratch dirs were left beside OUT"
    assert digest(*inputs) == before


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc")
def test_sigterm_while_workers_write_stops_them_and_leaves_nothing(inputs, tmp_path):
    process = _start_merge(inputs, tmp_path / "out", "--workers", "2", "--max-shard-size", "4KB")
    deadline, workers = time.monotonic() + 120, set()
    while not workers and time.monotonic() < deadline and process.poll() is None:
        workers = _children(process.pid)
        time.sleep(0.001)
    assert workers, f"no worker process appeared: {process.communicate()}"
    process.send_signal(signal.SIGSTOP)
    workers |= _children(process.pid)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and TRACEBACK not in err, err
    assert _leftovers(tmp_path) == []
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived the merge"


@pytest.mark.process
@pytest.mark.slow
def test_sigterm_while_the_adapter_is_staged_for_migration_leaves_nothing(inputs, tmp_path):
    process = _start_merge(inputs, tmp_path / "out")
    _stop_when_staging(process, tmp_path, kind="adapter")
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and TRACEBACK not in err, err
    assert _leftovers(tmp_path) == []


@pytest.mark.process
@pytest.mark.slow
def test_a_run_killed_outright_is_cleaned_up_by_the_next_run_into_the_same_place(inputs, tmp_path):
    process = _start_merge(inputs, tmp_path / "out")
    _stop_when_staging(process, tmp_path)
    process.kill()
    process.communicate()
    assert any("staging" in name for name in _leftovers(tmp_path)), "SIGKILL should leave the staging dir"
    process = _start_merge(inputs, tmp_path / "out", "--json")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert any("left by an interrupted run" in w for w in json.loads(out)["warnings"])
    assert "left by an interrupted run" in err
    assert _leftovers(tmp_path) == ["out"]


# --- headers are never trusted ------------------------------------------------------------------------------------


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def _overlap(header: dict) -> None:
    """The second tensor's range moved 4 bytes back, into the first's (sizes unchanged)."""
    second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]
    header[second]["data_offsets"] = [n - 4 for n in header[second]["data_offsets"]]


def _huge(header: dict) -> None:
    """One more tensor of 2 GiB, after the last one, stored in no bytes at all."""
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["base_model.model.huge.lora_A.weight"] = {
        "dtype": "F32",
        "shape": [2**29],
        "data_offsets": [end, end + 2**31],
    }


@pytest.mark.parametrize(
    ("which", "edit", "needle"),
    [
        ("base", _overlap, "overlaps"),
        ("adapter", _overlap, "overlaps"),
        ("adapter", _huge, "the file holds"),
    ],
    ids=["base-overlapping-ranges", "adapter-overlapping-ranges", "adapter-claims-2GB-in-0-bytes"],
)
@pytest.mark.parametrize("check_outputs", ["never", "auto"])
def test_a_damaged_safetensors_header_is_refused_before_any_merge(cli, inputs, tmp_path, which, edit, needle,
                                                                  check_outputs):  # fmt: skip
    base, adapter = inputs
    weights = (base / "model.safetensors") if which == "base" else (adapter / "adapter_model.safetensors")
    _rewrite_header(weights, edit)
    before = digest(*inputs)
    code, _, err = cli("merge", *inputs, "-o", tmp_path / "out", "--check-outputs", check_outputs)
    assert code == 2 and needle in err and weights.name in err and TRACEBACK not in err, err
    assert _leftovers(tmp_path) == [] and digest(*inputs) == before


# --- a full disk --------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path, models):
    """A tmpfs half the size of the base model (root only: mounting needs it)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root; ENOSPC is then covered by the simulated-error test")
    mount = tmp_path / "small"
    mount.mkdir()
    size = max(8192, (models[0] / "model.safetensors").stat().st_size // 2)  # the merged weights cannot fit
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("backend", ["auto", "peft"])  # auto: the stream backend where the installed PEFT allows
def test_a_full_disk_says_how_much_room_the_merge_needs_and_leaves_nothing(cli, inputs, small_disk, backend):
    before = digest(*inputs)
    code, _, err = cli("merge", *inputs, "-o", small_disk / "out", "--backend", backend)
    assert code == 2 and TRACEBACK not in err, err
    assert "no space left" in err and "it needs about" in err and "nothing was written" in err, err
    assert list(small_disk.iterdir()) == [] and digest(*inputs) == before
