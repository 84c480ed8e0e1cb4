"""The PEFT backend's writer (safe_merge/io/model_dir.py): the project's shard writer, under the names the base
stores, never transformers' save_pretrained."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import safe_merge
from safe_merge.compat.adapter_files import load_adapter
from safe_merge.io.checkpoint import Checkpoint
from safe_merge.io.model_dir import write_model
from safe_merge.merger.backends.peft import merge
from tests.helpers import materialize, save_model
from tests.moe import fused, tiny_moe
from tests.release import CONVERTED_AT_LOAD_BUG, HISTORY, INSTALLED
from tests.strategies import TINY, Case


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("gpt2", False), ("bert_cls", True)])
def test_the_writer_keeps_the_base_names_with_the_bits_and_config_save_pretrained_would_write(tmp_path, arch, tied):
    if arch == "gpt2" and HISTORY.affected("merge_refuses_gpt2", INSTALLED):
        pytest.skip(
            f"peft {INSTALLED} refuses to merge GPT-2 (fixed in {HISTORY.boundaries['merge_refuses_gpt2']['until']})"
        )
    lora = {"r": 4, "lora_alpha": 8, "target_modules": _targets(arch)}
    case = Case(arch, TINY["two_layers"], tied, lora, "bfloat16", seed=5)
    base, adapter = materialize(case, tmp_path / "in")
    model, _ = merge(base, load_adapter(adapter), torch.bfloat16)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    files, notes = write_model(model, ours, base, adapter, "5GB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(theirs), safe_serialization=True)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(a) == set(Checkpoint(base).tensors) and notes == []
    state = model.state_dict()
    assert all(a[k].dtype == state[k].dtype and torch.equal(a[k], state[k]) for k in a)
    if a.keys() == b.keys():
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:  # transformers 5.5 writes BERT's LayerNorm back as gamma/beta, names the base never had
        assert {k for k in b if k not in a} <= {k.replace(".weight", ".gamma").replace(".bias", ".beta") for k in a}
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    assert "config.json" in files and not any(f.startswith("adapter_") for f in files)


def test_a_shard_limit_splits_the_checkpoint_with_an_index_like_transformers(tmp_path):
    case = Case(
        "llama", TINY["two_layers"], False, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, "float32", seed=2
    )
    base, adapter = materialize(case, tmp_path / "in")
    model, _ = merge(base, load_adapter(adapter), torch.float32)
    (tmp_path / "out").mkdir()
    files, _ = write_model(model, tmp_path / "out", base, adapter, "20KB")
    shards = [f for f in files if f.endswith(".safetensors")]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(Checkpoint(tmp_path / "out").tensors)


def test_a_merge_never_calls_save_pretrained(tmp_path, monkeypatch):
    """A transformers whose save_pretrained breaks (e.g. a weight conversion without a reverse) cannot break it."""
    case = Case(
        "llama",
        TINY["two_layers"],
        True,
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "bfloat16",
        seed=4,
    )
    base, adapter = materialize(case, tmp_path / "in")

    def broken(*args, **kwargs):
        raise NotImplementedError("reverse_op")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
    report = safe_merge.merge(base, [adapter], tmp_path / "out", backend="peft")
    assert report["status"] == "passed" and report["backend"] == "peft"


@pytest.fixture
def mixtral(tmp_path):
    if CONVERTED_AT_LOAD_BUG:
        pytest.skip(CONVERTED_AT_LOAD_BUG)
    if not hasattr(transformers, "MixtralConfig") or not fused("mixtral"):
        pytest.skip("this transformers keeps Mixtral's experts as separate modules: nothing is converted at load")
    base = tiny_moe("mixtral", seed=1)
    save_model(base, tmp_path / "base")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    save_model(peft.get_peft_model(copy.deepcopy(base), lora), tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def test_a_model_converted_at_load_is_written_in_the_base_layout(mixtral, tmp_path):
    base, adapter = mixtral
    report = safe_merge.merge(base, [adapter], tmp_path / "out", backend="peft")
    assert report["status"] == "passed"
    assert set(Checkpoint(tmp_path / "out").tensors) == set(Checkpoint(base).tensors)


def test_a_transformers_that_cannot_revert_a_conversion_still_merges_and_says_so(mixtral, tmp_path, monkeypatch):
    import transformers.core_model_loading as loading

    def no_reverse(*args, **kwargs):
        raise NotImplementedError("this conversion has no reverse_op")

    monkeypatch.setattr(loading, "revert_weight_conversion", no_reverse)
    base, adapter = mixtral
    report = safe_merge.merge(base, [adapter], tmp_path / "out", backend="peft")
    assert report["status"] == "passed", report.get("problems")
    assert any("no reverse_op" in w and "in-memory names" in w for w in report["warnings"])
    assert any(name.endswith("experts.gate_up_proj") for name in Checkpoint(tmp_path / "out").tensors)


def _targets(arch: str) -> list[str]:
    return {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert_cls": ["query", "value"]}[arch]
