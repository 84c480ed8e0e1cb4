"""--workers: the stream backend's shards merged by several processes write the same bytes as one process, and
every tensor is checked as it is written, whichever process wrote it."""

from __future__ import annotations

import pytest
import torch

from safe_merge.io.shards import Slot
from safe_merge.merger.backends.stream.parallel import AUTO_MIN_BYTES, balance, choose_workers
from tests.helpers import digest
from tests.release import requires_release

# workers are real processes, whatever the llama_pair: run once, by the tests session (the process marker)
pytestmark = [requires_release("stream_backend_matches"), pytest.mark.process]


@pytest.fixture(scope="module")
def one_process(llama_pair, tmp_path_factory):
    """The merge in one process (in shards of 60 KB), and its report."""
    from safe_merge.api import merge

    out = tmp_path_factory.mktemp("one") / "out"
    report = merge(llama_pair[0], llama_pair[1], out, max_shard_size="60KB", card=False, workers=1)
    assert report["exit_code"] == 0 and report["stream"]["workers"] == 1
    return out, report


def test_two_workers_write_the_bytes_one_process_writes(llama_pair, one_process, tmp_path, cli):
    out = tmp_path / "two"
    code, report, err = cli(
        "merge", *llama_pair, "-o", out, "--max-shard-size", "60KB", "--workers", "2", "--no-card", "--json"
    )
    assert code == 0, err
    assert digest(one_process[0]) == digest(out)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    assert report["stream"]["workers"] == 2
    assert report["verification"]["weights"]["exact"] == one_process[1]["verification"]["weights"]["exact"]
    assert one_process[1]["verification"]["weights"]["exact"] == {"merge_and_unload()": 6}
    assert report["stream"]["tensors"] == one_process[1]["stream"]["tensors"]


def test_workers_are_dealt_shards_by_size_and_auto_keeps_small_outputs_in_one_process():
    slots = {f"s{i}": [Slot("t", torch.float32, (n,))] for i, n in enumerate([100, 10, 60, 50])}
    assert balance(slots, 2) == [["s0", "s1"], ["s2", "s3"]]  # 110 and 110 bytes
    assert choose_workers(None, 8, AUTO_MIN_BYTES - 1, 0, 2**40, cores=64) == 1
    assert choose_workers(None, 8, AUTO_MIN_BYTES, 2**30, 3 * 2**30, cores=64) == 2  # memory for two workers
    assert choose_workers(None, 8, AUTO_MIN_BYTES, 0, 2**40, cores=16) == 4  # four cores each
    assert choose_workers(None, 8, AUTO_MIN_BYTES, 0, 2**40, cores=2) == 1  # measured: two were no faster
    assert choose_workers(5, 3, 0, 0, 0) == 3  # at most one per shard


def test_what_a_worker_raises_is_raised_by_the_coordinator_and_the_others_stop(llama_pair, tmp_path):
    from safe_merge.merger.backends.stream.parallel import Inputs, run

    inputs = Inputs(
        tmp_path / "no-base", llama_pair[1], torch.bfloat16, torch.float32, "default", "dequantize", "cpu", True, 1
    )
    declared = {f"s{i}.safetensors": [Slot("t", torch.float32, (4,))] for i in range(2)}
    with pytest.raises(FileNotFoundError, match="no-base"):  # the worker's own exception, carried back
        run(inputs, tmp_path / "out", declared, 2)
    assert not (tmp_path / "out").exists()


def test_ray_workers_on_a_local_cluster_write_the_bytes_one_process_writes(llama_pair, one_process, tmp_path, cli):
    pytest.importorskip("ray", reason="Ray is the ray extra (installed in the tests session)")
    out = tmp_path / "ray"
    extra = ("--ray", "local", "--workers", "2")
    code, report, err = cli("merge", *llama_pair, "-o", out, "--max-shard-size", "60KB", "--no-card", "--json", *extra)
    assert code == 0, err
    assert digest(one_process[0]) == digest(out)
    assert report["stream"]["workers"] == 2
    assert report["verification"]["weights"]["exact"] == {"merge_and_unload()": 6}


def test_ray_without_ray_installed_is_refused_saying_how_to_install_it(llama_pair, tmp_path, cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, _, err = cli("merge", *llama_pair, "-o", tmp_path / "out", "--ray", "local", "--max-shard-size", "60KB")
    assert code == 2 and "safe-merge[ray]" in err, err
    assert not (tmp_path / "out").exists()


def test_device_cpu_is_the_default_and_a_device_torch_cannot_use_is_refused_before_any_work(llama_pair, tmp_path, cli):
    code, report, err = cli("merge", *llama_pair, "-o", tmp_path / "cpu", "--device", "cpu", "--no-card", "--json")
    assert code == 0, err
    code, _, err = cli("merge", *llama_pair, "-o", tmp_path / "auto", "--device", "auto", "--no-card")
    assert code == 0, err
    assert digest(tmp_path / "cpu") == digest(tmp_path / "auto") or torch.cuda.is_available()
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: --device cuda would run")
    code, _, err = cli("merge", *llama_pair, "-o", tmp_path / "gpu", "--device", "cuda")
    assert code == 2 and "torch sees no CUDA device" in err, err
    code, _, err = cli("merge", *llama_pair, "-o", tmp_path / "gpu", "--device", "tpu9")
    assert code == 2 and "--device" in err, err
    assert not (tmp_path / "gpu").exists()
