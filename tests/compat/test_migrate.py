"""Migrations: refusals exit 2 and write nothing; conversions keep the model's answers; inputs never change."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from packaging.version import Version

from safe_merge.compat.adapter_files import load_adapter, read_tensors
from safe_merge.compat.history import NEVER_WRITTEN, History
from safe_merge.compat.plan import make_plan
from safe_merge.io import loading
from tests.helpers import digest, save_adapter, save_model
from tests.release import requires
from tests.strategies import FEATURES, TINY, Case, build_base

HISTORY = History.load()
INSTALLED = Version(peft.__version__).base_version
SIZES = TINY["two_layers"]
RELEASES = sorted({e.first for e in HISTORY.entries.values()} | {"0.3.0", "0.6.2", "0.7.1", "0.13.2"}, key=Version)
TABLE_RELEASES = [r for r in RELEASES if Version(r) >= Version("0.3.0")]


def _adapter(root: Path, arch: str = "llama", **lora) -> tuple[Case, torch.nn.Module, Path]:
    case = Case(arch, SIZES, False, {"r": 4, "lora_alpha": 8, **lora}, "float32", seed=21, delta_scale=1.0)
    base = build_base(case)
    save_adapter(case, base, root / "adapter")
    return case, base, root / "adapter"


def _logits(base: torch.nn.Module, adapter_dir: Path) -> torch.Tensor:
    model = loading.load_peft(copy.deepcopy(base), adapter_dir)
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6) % SIZES["vocab"]).logits


@requires("use_dora")
def test_dora_adapter_to_0_7_1_is_refused_and_nothing_is_written(tmp_path, cli):
    _, _, adapter = _adapter(tmp_path, target_modules=["q_proj", "v_proj"], use_dora=True)
    before = digest(adapter)
    code, _, err = cli("migrate", adapter, "-o", tmp_path / "out", "--target", "0.7.1", "--json")
    assert code == 2 and "use_dora = true" in err and "0.9.0" in err
    assert not (tmp_path / "out").exists() and digest(adapter) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging dir left


@requires("use_rslora")
def test_rslora_folds_into_lora_b_and_answers_the_same(tmp_path, cli):
    _, base, adapter = _adapter(tmp_path, target_modules=["q_proj", "v_proj", "embed_tokens"], use_rslora=True)
    before = digest(adapter)
    code, report, err = cli("migrate", adapter, "-o", tmp_path / "old", "--target", "0.7.1", "--json")
    assert code == 0, err
    assert digest(adapter) == before  # the input is read, never written
    assert "rslora-fold-into-lora-b" in [s["id"] for s in report["steps"]]
    config = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    assert "use_rslora" not in config and set(config) <= HISTORY.keys_in("0.7.1")
    diff = (_logits(base, adapter) - _logits(base, tmp_path / "old")).abs().max()
    assert diff <= 1e-5, diff  # only B's float32 rounding moved


@pytest.mark.skipif(
    Version(INSTALLED) < HISTORY.boundary("targeted_bias_under_base_layer"),
    reason="starts from an adapter with base_layer keys, which the installed PEFT does not write",
)
def test_targeted_bias_keys_cross_the_0_7_boundary_both_ways(tmp_path, cli):
    _, base, adapter = _adapter(tmp_path, target_modules=["q_proj", "v_proj"], bias="all")
    assert any(k.endswith("q_proj.base_layer.bias") for k in read_tensors(adapter / "adapter_model.safetensors"))
    assert cli("migrate", adapter, "-o", tmp_path / "v06", "--target", "0.6.2", "--json")[0] == 0
    old_keys = read_tensors(tmp_path / "v06" / "adapter_model.safetensors")
    assert any(k.endswith("q_proj.bias") for k in old_keys) and not any("base_layer" in k for k in old_keys)
    code, report, _ = cli("migrate", tmp_path / "v06", "-o", tmp_path / "back", "--target", INSTALLED, "--json")
    assert code == 0 and "base-layer-key-naming" in [s["id"] for s in report["steps"]]
    assert torch.equal(_logits(base, adapter), _logits(base, tmp_path / "back"))


@pytest.mark.skipif(
    not FEATURES["writes_safetensors"], reason="peft 0.3 writes and reads .bin beside this test's safetensors"
)
def test_weights_go_to_bin_for_0_3_and_back_to_safetensors_without_unpickling_code(tmp_path, cli):
    _, base, adapter = _adapter(tmp_path, target_modules=["q_proj", "v_proj"])
    assert cli("migrate", adapter, "-o", tmp_path / "v03", "--target", "0.3.0", "--json")[0] == 0
    assert (tmp_path / "v03" / "adapter_model.bin").is_file()
    assert not (tmp_path / "v03" / "adapter_model.safetensors").exists()
    torch.load(tmp_path / "v03" / "adapter_model.bin", weights_only=True)  # a plain dict of tensors
    code, report, _ = cli("migrate", tmp_path / "v03", "-o", tmp_path / "new", "--target", INSTALLED, "--json")
    assert code == 0 and report["steps"][0]["id"] == "bin-to-safetensors"
    assert torch.equal(_logits(base, adapter), _logits(base, tmp_path / "new"))


@pytest.mark.parametrize(
    ("value", "target", "ok"),
    [("gaussian", "0.6.2", True), ("eva", "0.13.2", True), ("pissa", "0.10.0", False), ("olora", "0.11.1", False)],
)
def test_init_values_become_true_or_are_refused(tmp_path, value, target, ok):
    _, _, adapter = _adapter(tmp_path, target_modules=["q_proj"])
    files = load_adapter(adapter)
    files.config["init_lora_weights"] = value
    plan, state = make_plan(files, target)
    assert plan.refused is not ok
    if ok:
        assert state.config["init_lora_weights"] is True
    else:
        assert plan.refusals[0]["key"] == "init_lora_weights" and plan.refusals[0]["value"] == value


def test_unknown_keys_go_only_when_empty(tmp_path):
    _, _, adapter = _adapter(tmp_path, target_modules=["q_proj"])
    files = load_adapter(adapter)
    files.config.update({"future_flag": None, "future_knob": 3})
    plan, _ = make_plan(files, INSTALLED)
    assert [r["key"] for r in plan.refusals] == ["future_knob"]


@pytest.mark.skipif(Version(INSTALLED) < Version("0.7.0"), reason="0.6.2 reads what this release writes")
def test_plan_flag_prints_the_plan_and_writes_nothing(tmp_path, cli):
    _, _, adapter = _adapter(tmp_path, target_modules=["q_proj"])
    code, report, _ = cli("migrate", adapter, "-o", tmp_path / "out", "--target", "0.6.2", "--json", "--plan")
    assert code == 0 and report["status"] == "migrate" and report["steps"]
    assert not (tmp_path / "out").exists()


@pytest.mark.property
@given(data=st.data())
def test_configs_saved_now_migrate_down_to_each_release_or_are_refused_by_the_table(data, tmp_path_factory):
    """Drawn configs, saved by the installed PEFT, moved to a drawn older release: either every refusal is a key
    that release lacks, or the result holds only keys that release has and answers like the original here."""
    from tests.strategies import cases

    case = data.draw(cases(arch="llama", dtype="float32"), label="case")
    target = data.draw(st.sampled_from(TABLE_RELEASES), label="target")
    root = tmp_path_factory.mktemp("mig")
    base = build_base(case)
    save_adapter(case, base, root / "adapter")
    plan, state = make_plan(load_adapter(root / "adapter"), target)
    if plan.refused:
        for refusal in plan.refusals:
            entry = HISTORY.entries.get(refusal["key"])
            assert entry is not None and not entry.present_in(target) or refusal["key"] == "init_lora_weights"
        return
    assert set(state.config) <= HISTORY.keys_in(target) - NEVER_WRITTEN
    naming, safetensors = HISTORY.boundary("targeted_bias_under_base_layer"), HISTORY.boundary("reads_safetensors")
    readable = Version(INSTALLED) >= safetensors or Version(target) < safetensors  # 0.3 reads only .bin
    if readable and (Version(target) >= naming) == (Version(INSTALLED) >= naming):  # and the target's key naming
        from safe_merge.compat.plan import write_state

        (root / "old").mkdir()
        write_state(state, root / "adapter", root / "old")
        diff = (_logits(base, root / "adapter") - _logits(base, root / "old")).abs().max()
        assert diff <= 1e-5, f"{target}: {plan.steps} moved logits by {diff}"


@requires("use_rslora", "rank_pattern", "alpha_pattern")
def test_rank_and_alpha_patterns_fold_for_releases_before_0_6(tmp_path, cli):
    layer = "layers.0.self_attn.q_proj"
    _, base, adapter = _adapter(
        tmp_path,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        use_rslora=True,
        rank_pattern={layer: 2},
        alpha_pattern={layer: 3},
    )
    code, report, err = cli("migrate", adapter, "-o", tmp_path / "v05", "--target", "0.5.0", "--json")
    assert code == 0, err
    assert [s["id"] for s in report["steps"]][:2] == ["rslora-fold-into-lora-b", "patterns-fold-into-lora-b"]
    config = json.loads((tmp_path / "v05" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and "rank_pattern" not in config
    diff = (_logits(base, adapter) - _logits(base, tmp_path / "v05")).abs().max()
    assert diff <= 1e-5, diff


@pytest.mark.skipif(
    not HISTORY.entries["target_parameters"].present_in(INSTALLED),
    reason="the installed PEFT cannot write target_parameters adapters",
)
def test_target_parameters_on_linear_weights_become_target_modules(tmp_path, cli):
    case = Case("llama", SIZES, False, {"r": 4, "lora_alpha": 8}, "float32", seed=3)
    base = build_base(case)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=["self_attn.q_proj.weight"], init_lora_weights=False
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    save_model(model, tmp_path / "adapter")
    zero = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    save_model(zero, tmp_path / "none")  # lora_B = 0: the base's own answers
    code, report, err = cli("migrate", tmp_path / "adapter", "-o", tmp_path / "v16", "--target", "0.16.0", "--json")
    assert code == 0, err
    assert "target-parameters-as-modules" in [s["id"] for s in report["steps"]]
    migrated = json.loads((tmp_path / "v16" / "adapter_config.json").read_text())
    assert "target_parameters" not in migrated and all(t.endswith("q_proj") for t in migrated["target_modules"])
    before, after = _logits(base, tmp_path / "adapter"), _logits(base, tmp_path / "v16")
    # a parameter LoRA adds B·A to the weight, a module LoRA adds x·Aᵀ·Bᵀ: the same sum, rounded differently
    assert (before - after).abs().max() <= 1e-6 and (before - _logits(base, tmp_path / "none")).abs().max() > 1e-3


def test_a_removed_key_with_a_value_is_refused_as_gone_not_as_new(tmp_path):
    _, _, adapter = _adapter(tmp_path, target_modules=["q_proj"])
    files = load_adapter(adapter)
    files.config.update({"enable_lora": [True, False, True], "merge_weights": True})
    plan, state = make_plan(files, INSTALLED)
    assert [(r["key"], r["first"]) for r in plan.refusals] == [("enable_lora", None)]
    assert "no release since 0.3.0" in plan.refusals[0]["reason"]
    files.config["enable_lora"] = None
    plan, state = make_plan(files, INSTALLED)
    assert not plan.refused and "enable_lora" not in state.config and "merge_weights" not in state.config
