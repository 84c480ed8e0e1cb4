"""Resume: a stream merge killed outright (SIGKILL) leaves its staging directory and journal; the same command
continues with the missing shards only and publishes the bytes an uninterrupted run writes. A journal made from
other inputs or options is never continued."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import digest
from tests.release import requires_release

SHARDS = ("--max-shard-size", "4KB", "--no-card")

pytestmark = requires_release("stream_backend_matches")  # stored formats, workers and journals are its


@pytest.fixture(scope="module")
def whole(llama_pair, tmp_path_factory):
    """The uninterrupted merge, for the bytes a continued one must write."""
    from safe_merge.api import merge

    out = tmp_path_factory.mktemp("whole") / "out"
    assert merge(llama_pair[0], llama_pair[1], out, max_shard_size="4KB", card=False)["exit_code"] == 0
    return out


def _start(llama_pair, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "safe_merge", "merge", *map(str, llama_pair), "-o", str(out), *SHARDS, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _kill_after_shards(process: subprocess.Popen, parent: Path, shards: int) -> Path:
    """SIGKILL the merge once its journal records ``shards`` complete shards; the journal's directory."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        journals = list(parent.glob(".*.journal"))
        if journals and len(list(journals[0].glob("*.safetensors.json"))) >= shards:
            process.send_signal(signal.SIGSTOP)
            process.kill()
            process.communicate()
            return journals[0]
        time.sleep(0.001)
    pytest.fail(f"the merge ended before {shards} shards were journaled: {process.communicate()}")


@pytest.mark.process
@pytest.mark.slow
def test_a_merge_killed_midway_continues_with_the_missing_shards_and_writes_the_same_bytes(
    llama_pair, whole, tmp_path, cli
):
    total = len(list(whole.glob("*.safetensors")))
    assert total >= 8
    work = tmp_path / "work"
    work.mkdir()
    journal = _kill_after_shards(_start(llama_pair, work / "out"), work, total // 2)
    kept = len(list(journal.glob("*.safetensors.json")))
    assert not (work / "out").exists()
    code, report, err = cli("merge", *llama_pair, "-o", work / "out", *SHARDS, "--json")
    assert code == 0, err
    assert report["stream"]["resumed_shards"] == kept
    assert any("continued the interrupted merge" in w for w in report["warnings"])
    assert report["verification"]["weights"]["checked_tensors"] == 6
    assert digest(work / "out") == digest(whole)
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # staging, marker and journal are gone


@pytest.mark.process
@pytest.mark.slow
def test_a_journal_from_other_options_is_removed_not_continued(llama_pair, tmp_path, cli):
    _kill_after_shards(_start(llama_pair, tmp_path / "out", "--dtype", "float32"), tmp_path, 1)
    code, report, err = cli("merge", *llama_pair, "-o", tmp_path / "out", *SHARDS, "--json")
    assert code == 0, err
    assert report["stream"]["resumed_shards"] == 0
    assert any("made from other inputs, options or versions" in w for w in report["warnings"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_a_full_disk_keeps_the_complete_shards_and_the_same_command_continues(
    llama_pair, whole, tmp_path, cli, monkeypatch
):
    import errno

    from safe_merge.io import shards

    original, calls = shards.ShardWriter.close, []

    def full_after_three(self):
        calls.append(self.path.name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return original(self)

    monkeypatch.setattr(shards.ShardWriter, "close", full_after_three)
    work = tmp_path / "work"
    code, _, err = cli("merge", *llama_pair, "-o", work / "out", *SHARDS)
    assert code == 2 and "no space left" in err and "run the same command again" in err, err
    kept = [p for p in work.iterdir() if p.name.endswith(".journal")]
    assert len(kept) == 1 and len(list(kept[0].glob("*.safetensors.json"))) == 3
    monkeypatch.setattr(shards.ShardWriter, "close", original)
    code, report, err = cli("merge", *llama_pair, "-o", work / "out", *SHARDS, "--json")
    assert code == 0, err
    assert report["stream"]["resumed_shards"] == 3
    assert digest(work / "out") == digest(whole)
    assert sorted(p.name for p in work.iterdir()) == ["out"]
