"""Merges a PEFT release is known to get wrong or to crash on are refused before any work, naming the release
that fixed them (the release is faked here; the matrix cells run the real ones)."""

from __future__ import annotations

import pytest

from safe_merge.merger import loading
from safe_merge.merger.cli import main
from tests.helpers import digest, materialize
from tests.strategies import FEATURES, HISTORY, INSTALLED, Case, _has_dora_layer

SIZES = {"vocab": 32, "hidden": 16, "layers": 1, "heads": 2, "kv_heads": 2}


def _pair(tmp_path, targets):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": targets, "use_dora": True}
    return materialize(Case("llama", SIZES, False, lora, "float32", seed=5), tmp_path / "inputs")


def _merge(tmp_path, capsys, base, adapter, *extra) -> tuple[int, str]:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    before = digest(base, adapter)
    code = main(["merge", str(base), str(adapter), "-o", str(work / "out"), *extra])
    err = capsys.readouterr().err
    if code != 0:
        assert list(work.iterdir()) == [] and digest(base, adapter) == before
    return code, err


@pytest.mark.skipif(not FEATURES["use_dora"] or not _has_dora_layer("DoraEmbeddingLayer"), reason="no DoRA embeddings")
def test_dora_on_embeddings_is_refused_where_peft_merges_it_wrongly(tmp_path, capsys, monkeypatch):
    base, adapter = _pair(tmp_path, ["embed_tokens", "q_proj"])
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.13.2")
    code, err = _merge(tmp_path, capsys, base, adapter)
    assert code == 2 and "merges DoRA on embeddings wrongly" in err and "fixed in 0.16.0" in err, err


@pytest.mark.skipif(not HISTORY.entries["use_dora"].present_in(INSTALLED), reason="no DoRA in this release")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dora_into_a_16_bit_model_is_refused_where_peft_crashes(tmp_path, capsys, monkeypatch, dtype):
    base, adapter = _pair(tmp_path, ["q_proj"])
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.14.0")
    code, err = _merge(tmp_path, capsys, base, adapter, "--dtype", dtype)
    assert code == 2 and f"cannot merge DoRA into a {dtype} model" in err and "--dtype float32" in err, err


@pytest.mark.skipif(not HISTORY.entries["use_dora"].present_in(INSTALLED), reason="no DoRA in this release")
def test_the_same_dora_adapter_merges_in_float32_there(tmp_path, capsys, monkeypatch):
    base, adapter = _pair(tmp_path, ["q_proj"])
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.14.0")
    code, err = _merge(tmp_path, capsys, base, adapter, "--dtype", "float32")
    assert code == 0, err


def test_dora_on_fan_in_fan_out_layers_is_refused_where_peft_cannot_load_it(tmp_path, capsys, monkeypatch):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "use_dora": True, "fan_in_fan_out": True}
    if not FEATURES["use_dora"] or not FEATURES["dora_fan_in_fan_out"]:
        pytest.skip("the installed PEFT cannot write this adapter")
    sizes = {"vocab": 32, "hidden": 16, "layers": 1, "heads": 2, "kv_heads": 2}
    base, adapter = materialize(Case("gpt2", sizes, True, lora, "float32", seed=6), tmp_path / "inputs")
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.10.0")
    code, err = _merge(tmp_path, capsys, base, adapter)
    assert code == 2 and "cannot load DoRA on fan_in_fan_out layers" in err and "fixed in 0.11.0" in err, err
