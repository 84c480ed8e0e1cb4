"""Staging: outputs appear complete or not at all, with the umask's permissions; side files go with them; what an
interrupted run left is recognised, reported and removed (or put back)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from safe_merge.errors import BadInput
from safe_merge.io import staging


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_published_output_has_the_permissions_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with staging.staged(tmp_path / "out", force=False) as stage:
            (stage / "f").write_text("x")
        staging.write_file(tmp_path / "side.json", "{}", force=False)
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "side.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert _entries(tmp_path) == ["out", "side.json"]


def test_a_failure_inside_the_block_leaves_nothing_not_even_the_parents_it_made(tmp_path):
    with pytest.raises(RuntimeError):
        with staging.staged(tmp_path / "new" / "deeper" / "out", force=False) as stage:
            (stage / "f").write_text("x")
            raise RuntimeError("verification failed")
    assert _entries(tmp_path) == []


def test_side_files_are_published_with_out_inside_or_beside_it(tmp_path):
    side = {}
    with staging.staged(tmp_path / "out", force=False, side_files=side) as stage:
        (stage / "model").write_text("m")
        side[tmp_path / "out" / "report.json"] = "inside"
        side[tmp_path / "reports" / "r.json"] = "beside"
    assert (tmp_path / "out" / "report.json").read_text() == "inside"
    assert (tmp_path / "reports" / "r.json").read_text() == "beside"
    assert _entries(tmp_path) == ["out", "reports"] and _entries(tmp_path / "reports") == ["r.json"]


def test_a_side_file_that_cannot_be_written_stops_the_publish(tmp_path):
    (tmp_path / "blocker").write_text("a file where a directory would be needed")
    side = {}
    with pytest.raises(OSError):
        with staging.staged(tmp_path / "out", force=False, side_files=side) as stage:
            (stage / "model").write_text("m")
            side[tmp_path / "blocker" / "r.json"] = "report"
    assert _entries(tmp_path) == ["blocker"]


def test_replacing_the_current_directory_leaves_no_empty_old_dir(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "stale").write_text("old")
    monkeypatch.chdir(tmp_path / "work")
    with staging.staged(Path("."), force=True) as stage:
        (stage / "fresh").write_text("new")
    assert _entries(tmp_path) == ["work"] and _entries(tmp_path / "work") == ["fresh"]


def test_write_file_refuses_an_existing_file_without_force_and_replaces_it_with(tmp_path):
    target = tmp_path / "fp.json"
    target.write_text("old")
    with pytest.raises(BadInput, match="already exists"):
        staging.write_file(target, "new", force=False)
    staging.write_file(target, "new", force=True)
    assert target.read_text() == "new" and _entries(tmp_path) == ["fp.json"]


def _left_behind(parent: Path, name: str, kind: str, pid: int, host: str | None = None) -> Path:
    path = staging.make_temporary(parent, name, kind)
    marker = path.with_name(path.name + staging.OWNER)
    owner = json.loads(marker.read_text())
    marker.write_text(json.dumps({**owner, "pid": pid, "host": host or owner["host"]}))
    return path


def test_stale_temporaries_of_dead_runs_are_removed_and_reported(tmp_path):
    stale = _left_behind(tmp_path, "out", "staging", _dead_pid())
    (stale / "model.safetensors").write_bytes(bytes(2**20))
    running = _left_behind(tmp_path, "other", "staging", os.getpid())
    foreign = _left_behind(tmp_path, "third", "staging", 1, host=socket.gethostname() + "-elsewhere")
    (tmp_path / ".not-ours.safe-merge-staging-x").mkdir()  # no marker: not ours to judge
    notes = staging.sweep_stale(tmp_path)
    assert not stale.exists() and running.exists() and foreign.exists()
    assert (tmp_path / ".not-ours.safe-merge-staging-x").exists()
    assert any(f"removed {stale}" in n and "1.0 MiB" in n for n in notes)
    assert any(f"left alone: {foreign}" in n for n in notes)
    assert len(notes) == 2


def test_an_empty_marker_of_a_run_killed_as_it_began_is_removed_once_it_is_seconds_old(tmp_path):
    """SIGKILL between creating the marker and writing it leaves an empty marker and no directory."""
    marker = tmp_path / f".out{staging.TAG}staging-0123abcd{staging.OWNER}"
    marker.touch()
    assert staging.sweep_stale(tmp_path) == [] and marker.exists()  # a run may be writing it this instant
    old = marker.stat().st_mtime - 2 * staging.MARKING_SECONDS
    os.utime(marker, (old, old))
    notes = staging.sweep_stale(tmp_path)
    assert not marker.exists() and len(notes) == 1 and "empty marker" in notes[0]


def test_an_old_output_moved_aside_by_a_killed_publish_is_put_back(tmp_path):
    old = _left_behind(tmp_path, "out", "old", _dead_pid())
    (old / "out").mkdir()
    (old / "out" / "model.safetensors").write_text("the user's previous model")
    notes = staging.sweep_stale(tmp_path)
    assert (tmp_path / "out" / "model.safetensors").read_text() == "the user's previous model"
    assert _entries(tmp_path) == ["out"]
    assert any("restored" in n for n in notes)
