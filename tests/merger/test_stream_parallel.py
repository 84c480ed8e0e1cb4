"""--workers: the stream backend's shards merged by several processes write the same bytes as one process, and
every tensor is checked as it is written, whichever process wrote it."""

from __future__ import annotations

import pytest
import torch

from safe_merge.io.shards import Slot
from safe_merge.merger.backends.stream.parallel import AUTO_MIN_BYTES, balance, choose_workers
from tests.helpers import digest
from tests.quant.stored import checkpoints
from tests.release import requires_release

pytestmark = requires_release("stream_backend_matches")  # stored formats, workers and journals are its


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    float_dir = checkpoints.float_model(root)
    return float_dir, checkpoints.adapter_for(float_dir, root)


def test_two_workers_write_the_bytes_one_process_writes(pair, tmp_path, cli):
    reports = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out-{workers}"
        code, report, err = cli(
            "merge", *pair, "-o", out, "--max-shard-size", "60KB", "--workers", workers, "--no-card", "--json"
        )
        assert code == 0, err
        reports[workers] = report
    assert digest(tmp_path / "out-1") == digest(tmp_path / "out-2")
    assert len(list((tmp_path / "out-2").glob("model-*.safetensors"))) >= 3
    assert reports["1"]["stream"]["workers"] == 1 and reports["2"]["stream"]["workers"] == 2
    one, two = (reports[w]["verification"]["weights"] for w in ("1", "2"))
    assert one["exact"] == two["exact"] == {"merge_and_unload()": 6}
    assert reports["2"]["stream"]["tensors"] == reports["1"]["stream"]["tensors"]


def test_workers_are_dealt_shards_by_size_and_auto_keeps_small_outputs_in_one_process():
    slots = {f"s{i}": [Slot("t", torch.float32, (n,))] for i, n in enumerate([100, 10, 60, 50])}
    assert balance(slots, 2) == [["s0", "s1"], ["s2", "s3"]]  # 110 and 110 bytes
    assert choose_workers(None, 8, AUTO_MIN_BYTES - 1, 0, 2**40) == 1
    assert choose_workers(None, 8, AUTO_MIN_BYTES, 2**30, 3 * 2**30) == 1  # memory for one worker only
    assert choose_workers(5, 3, 0, 0, 0) == 3  # at most one per shard


def test_what_a_worker_raises_is_raised_by_the_coordinator_and_the_others_stop(pair, tmp_path):
    from safe_merge.merger.backends.stream.parallel import Inputs, run

    inputs = Inputs(tmp_path / "no-base", pair[1], torch.bfloat16, torch.float32, "default", "dequantize", True, 1)
    declared = {f"s{i}.safetensors": [Slot("t", torch.float32, (4,))] for i in range(2)}
    with pytest.raises(FileNotFoundError, match="no-base"):  # the worker's own exception, carried back
        run(inputs, tmp_path / "out", declared, 2)
    assert not (tmp_path / "out").exists()
