"""Merges a PEFT release is known to get wrong or to crash on are refused before any work, naming the release
that fixed them (the release is faked here; the matrix cells run the real ones)."""

from __future__ import annotations

import pytest

from safe_merge.cli import main
from safe_merge.io import loading
from tests.helpers import materialize, merge_refused, save_adapter
from tests.release import requires
from tests.strategies import FEATURES, HISTORY, INSTALLED, TINY, Case, _has_dora_layer, build_base

SIZES = TINY["one_layer"]


def _base():
    """The base every adapter of a several-adapter test here is trained on (materialize builds it from seed 7)."""
    return build_base(Case("llama", SIZES, False, {}, "float32", seed=7))


def _pair(tmp_path, targets):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": targets, "use_dora": True}
    return materialize(Case("llama", SIZES, False, lora, "float32", seed=5), tmp_path / "inputs")


@pytest.mark.skipif(not FEATURES["use_dora"] or not _has_dora_layer("DoraEmbeddingLayer"), reason="no DoRA embeddings")
def test_dora_on_embeddings_is_refused_where_peft_merges_it_wrongly(tmp_path, capsys, monkeypatch):
    base, adapter = _pair(tmp_path, ["embed_tokens", "q_proj"])
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.13.2")
    merge_refused(tmp_path, capsys, [base, adapter], [], "merges DoRA on embeddings wrongly", "fixed in 0.16.0")


@pytest.mark.skipif(not HISTORY.entries["use_dora"].present_in(INSTALLED), reason="no DoRA in this release")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dora_into_a_16_bit_model_is_refused_where_peft_crashes(tmp_path, capsys, monkeypatch, dtype):
    base, adapter = _pair(tmp_path, ["q_proj"])
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.14.0")
    needles = (f"cannot merge DoRA into a {dtype} model", "--dtype float32")
    merge_refused(tmp_path, capsys, [base, adapter], ["--dtype", dtype], *needles)


@pytest.mark.skipif(not HISTORY.entries["use_dora"].present_in(INSTALLED), reason="no DoRA in this release")
def test_the_same_dora_adapter_merges_in_float32_there(tmp_path, capsys, monkeypatch):
    base, adapter = _pair(tmp_path, ["q_proj"])
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.14.0")
    code = main(["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err


def test_dora_on_fan_in_fan_out_layers_is_refused_where_peft_cannot_load_it(tmp_path, capsys, monkeypatch):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "use_dora": True, "fan_in_fan_out": True}
    if not FEATURES["use_dora"] or not FEATURES["dora_fan_in_fan_out"]:
        pytest.skip("the installed PEFT cannot write this adapter")
    sizes = TINY["one_layer"]
    base, adapter = materialize(Case("gpt2", sizes, True, lora, "float32", seed=6), tmp_path / "inputs")
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.10.0")
    needles = ("cannot load DoRA on fan_in_fan_out layers", "fixed in 0.11.0")
    merge_refused(tmp_path, capsys, [base, adapter], [], *needles)


def test_svd_of_adapters_on_embeddings_is_refused_where_peft_transposes_them(tmp_path, capsys, monkeypatch):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}
    base, first = materialize(Case("llama", SIZES, False, lora, "float32", seed=7), tmp_path / "one")
    second = tmp_path / "two"
    save_adapter(
        Case("llama", SIZES, False, lora, "float32", seed=8),
        build_base(Case("llama", SIZES, False, lora, "float32", seed=7)),
        second,
    )
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.8.2")
    needles = ("cannot combine adapters on embeddings", "embed_tokens", "fixed in 0.9.0")
    merge_refused(tmp_path, capsys, [base, first, second], ["--combination", "svd"], *needles)


@requires("rank_pattern")
def test_cat_of_an_adapter_whose_rank_pattern_exceeds_r_is_refused_where_peft_overflows(tmp_path, capsys, monkeypatch):
    lora = {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 4}}
    base, first = materialize(Case("llama", SIZES, False, {**lora, "rank_pattern": {}}, "float32", seed=7), tmp_path)
    second = tmp_path / "patterned"
    save_adapter(Case("llama", SIZES, False, lora, "float32", seed=8), _base(), second)
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.13.2")
    needles = ("cannot hold rank_pattern 'q_proj': 4 (r = 2)", "fixed in 0.16.0")
    merge_refused(tmp_path, capsys, [base, first, second], [], *needles)


def test_adapters_on_different_modules_are_refused_where_peft_cannot_combine_them(tmp_path, capsys, monkeypatch):
    base, first = materialize(Case("llama", SIZES, False, {"target_modules": ["q_proj"]}, "float32", seed=7), tmp_path)
    second = tmp_path / "other"
    save_adapter(
        Case("llama", SIZES, False, {"target_modules": ["q_proj", "v_proj"]}, "float32", seed=8), _base(), second
    )
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.5.0")
    needles = ("can only combine adapters that target the same modules", "v_proj", "fixed in 0.6.0")
    merge_refused(tmp_path, capsys, [base, first, second], ["--combination", "linear"], *needles)


def test_svd_is_refused_where_peft_clamps_the_combined_factors(tmp_path, capsys, monkeypatch):
    base, first = materialize(Case("llama", SIZES, False, {"target_modules": ["q_proj"]}, "float32", seed=7), tmp_path)
    second = tmp_path / "other"
    save_adapter(Case("llama", SIZES, False, {"target_modules": ["q_proj"]}, "float32", seed=8), _base(), second)
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.4.0")
    needles = ("clamps the svd-combined factors", "fixed in 0.5.0")
    merge_refused(tmp_path, capsys, [base, first, second], ["--combination", "svd"], *needles)


@requires("lora_bias")
def test_lora_bias_is_refused_where_peft_merges_it_unscaled(tmp_path, capsys, monkeypatch):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_bias": True}
    base, adapter = materialize(Case("llama", SIZES, False, lora, "float32", seed=9), tmp_path / "inputs")
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.15.2")
    needles = ("merges lora_bias without the module's scale", "scale 2", "fixed in 0.16.0")
    merge_refused(tmp_path, capsys, [base, adapter], [], *needles)


@pytest.mark.skipif(not FEATURES["embedding_merge"], reason="the installed release cannot write this adapter")
def test_lora_on_embeddings_is_refused_where_peft_cannot_merge_it(tmp_path, capsys, monkeypatch):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}
    base, adapter = materialize(Case("llama", SIZES, False, lora, "float32", seed=10), tmp_path / "inputs")
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.3.0")
    needles = ("cannot merge LoRA on embeddings (model.embed_tokens)", "fixed in 0.4.0")
    merge_refused(tmp_path, capsys, [base, adapter], [], *needles)


@pytest.mark.skipif(not FEATURES["config_free_merge"], reason="the installed release cannot write this adapter")
def test_gpt2_is_refused_where_peft_cannot_merge_it(tmp_path, capsys, monkeypatch):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True}
    base, adapter = materialize(Case("gpt2", SIZES, True, lora, "float32", seed=11), tmp_path / "inputs")
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.3.0")
    merge_refused(tmp_path, capsys, [base, adapter], [], "cannot merge into GPT-2 models", "fixed in 0.4.0")
