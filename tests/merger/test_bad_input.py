"""Every bad input: a clear message naming the file and what to do, exit 2, inputs untouched, no output left."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safe_merge.cli import main
from safe_merge.demo import build_tokenizer
from safe_merge.io.shards import ShardWriter
from safe_merge.merger.backends import peft as peft_backend
from tests.helpers import materialize, merge_refused, small_pair
from tests.strategies import FEATURES, TINY, Case

SIZES = TINY["one_layer"]


@pytest.fixture
def pair(tmp_path):
    """A fresh base and adapter per test (tests edit copies of them)."""
    return small_pair(tmp_path / "inputs")


def _merge_fails(base: Path, adapter: Path, tmp_path: Path, capsys, *needles: str, code: int = 2) -> str:
    return merge_refused(tmp_path, capsys, [base, adapter], [], *needles, code=code)


def test_malformed_adapter_config(pair, tmp_path, capsys):
    base, adapter = pair
    (adapter / "adapter_config.json").write_text('{"r": 4,')
    _merge_fails(base, adapter, tmp_path, capsys, "adapter_config.json", "not valid JSON")


@pytest.mark.skipif(
    not FEATURES["writes_safetensors"], reason="peft 0.3 writes and reads .bin beside this test's safetensors"
)
def test_missing_weight_file(pair, tmp_path, capsys):
    base, adapter = pair
    (adapter / "adapter_model.safetensors").unlink()
    _merge_fails(base, adapter, tmp_path, capsys, "no adapter weights", "what to do")


def test_truncated_weight_file(pair, tmp_path, capsys):
    base, adapter = pair
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _merge_fails(
        base, adapter, tmp_path, capsys, "adapter_model.safetensors", "truncated?", "save or download it again"
    )


class _Payload:
    """Unpickling this would create a marker file: proof of executed code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_never_executed(pair, tmp_path, capsys):
    base, adapter = pair
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"base_model.model.x.lora_A.weight": _Payload(str(marker))}, adapter / "adapter_model.bin")
    _merge_fails(base, adapter, tmp_path, capsys, "adapter_model.bin", "cannot read the weights")
    assert not marker.exists()


def test_nan_in_adapter_tensors(pair, tmp_path, capsys):
    base, adapter = pair
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    _merge_fails(base, adapter, tmp_path, capsys, "NaN or Inf", key)


def test_adapter_trained_on_another_base(pair, tmp_path, capsys):
    _, adapter = pair
    other = Case("llama", {**SIZES, "hidden": 32}, False, {"r": 4, "target_modules": ["q_proj"]}, "float32", seed=5)
    other_base, _ = materialize(other, tmp_path / "other")
    _merge_fails(
        other_base, adapter, tmp_path, capsys, "PEFT cannot load this adapter onto the base", "trained on this base"
    )


@pytest.mark.skipif(
    not FEATURES["writes_safetensors"], reason="peft 0.3 writes and reads .bin beside this test's safetensors"
)
def test_adapter_targeting_modules_the_base_lacks(pair, tmp_path, capsys):
    base, adapter = pair
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _merge_fails(base, adapter, tmp_path, capsys, "PEFT cannot load this adapter")


def test_adapter_whose_tensors_disagree_with_its_own_rank(pair, tmp_path, capsys):
    base, adapter = pair
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 8  # the tensors are rank 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _merge_fails(base, adapter, tmp_path, capsys, "PEFT cannot load this adapter")


def test_tokenizer_larger_than_the_embedding(pair, tmp_path, capsys):
    base, adapter = pair
    tokenizer = build_tokenizer(adapter)  # the adapter ships its own tokenizer...
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(40)])  # ...with more ids than the base has rows
    tokenizer.save_pretrained(str(adapter))
    _merge_fails(base, adapter, tmp_path, capsys, "tokenizer.json", "token ids", "rows")


@pytest.mark.parametrize(
    ("error", "needle", "code"),
    [
        (KeyboardInterrupt(), "interrupted by SIGINT", 130),
        (OSError(errno.ENOSPC, "No space left on device", "model.safetensors"), "no space left", 2),
        (RuntimeError("SafetensorError: No space left on device (os error 28)"), "it needs about", 2),
    ],
    ids=["ctrl-c", "disk-full", "disk-full-as-the-library-says-it"],
)
def test_interrupted_or_failed_write_leaves_nothing(pair, tmp_path, capsys, monkeypatch, error, needle, code):
    base, adapter = pair

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(peft_backend, "write_model", fail)  # the PEFT backend's writer
    monkeypatch.setattr(ShardWriter, "write", fail)  # the stream backend's, mid-shard
    _merge_fails(base, adapter, tmp_path, capsys, needle, "nothing was written", code=code)


def test_existing_output_survives_a_failed_forced_merge(pair, tmp_path, capsys, monkeypatch):
    base, adapter = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(peft_backend, "write_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(ShardWriter, "write", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["merge", str(base), str(adapter), "-o", str(out), "--force"]) == 130
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "out"]


@pytest.mark.slow
def test_hub_ids_resolve_from_the_local_cache_and_say_so_when_absent(pair, tmp_path):
    base, adapter = pair
    cache = tmp_path / "hub"
    revision = "0" * 40
    for repo, source in (("acme/tiny-base", base), ("acme/tiny-adapter", adapter)):
        root = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(source, root / "snapshots" / revision)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def merge(base_id: str, out: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "safe_merge", "merge", base_id, "acme/tiny-adapter", "-o", out]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    done = merge("acme/tiny-base", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    missing = merge("acme/not-cached", str(tmp_path / "out2"))
    assert missing.returncode == 2 and "is not in the hub cache" in missing.stderr
    assert "hf download acme/not-cached" in missing.stderr


def _config_edit(name: str, **changes):
    def edit(base: Path, adapter: Path) -> None:
        path = (adapter if name == "adapter" else base) / (
            "adapter_config.json" if name == "adapter" else "config.json"
        )
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _replace_base_weights_with_a_broken_bin(base: Path, adapter: Path) -> None:
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(b"not a pickle of tensors")


FAULTS = {
    "lora_alpha null": (_config_edit("adapter", lora_alpha=None), ["adapter_config.json", "'lora_alpha'", "positive"]),
    "rank as a string": (_config_edit("adapter", r="4"), ["adapter_config.json", "'r'", "well-formed-config"]),
    "alpha_pattern of strings": (_config_edit("adapter", alpha_pattern={"q_proj": "8"}), ["'alpha_pattern'"]),
    "broken tokenizer.json": (
        lambda base, adapter: (adapter / "tokenizer.json").write_text("{not json"),
        ["adapter/tokenizer.json", "is not a tokenizer", "save the tokenizer again"],
    ),
    "unknown model_type": (_config_edit("base", model_type="nosuch"), ["base/config.json", "base-readable"]),
    "vocab_size of the wrong type": (_config_edit("base", vocab_size="32"), ["base/config.json", "vocab_size"]),
    "a .bin that is not tensors": (_replace_base_weights_with_a_broken_bin, ["pytorch_model.bin", "not a PyTorch"]),
}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_a_fault_is_refused_before_any_work_naming_its_file(pair, tmp_path, capsys, fault):
    edit, needles = FAULTS[fault]
    base, adapter = pair
    edit(base, adapter)
    err = _merge_fails(base, adapter, tmp_path, capsys, *needles)
    assert "unexpected error" not in err and "staging" not in err


def test_an_output_under_a_file_and_a_zero_shard_size_are_refused(pair, tmp_path, capsys):
    base, adapter = pair
    (tmp_path / "file").write_text("x")
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "file" / "out")]) == 2
    assert "which is a file" in capsys.readouterr().err
    merge_refused(tmp_path, capsys, [base, adapter], ["--max-shard-size", "0"], "is not a size")
