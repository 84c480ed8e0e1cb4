"""What the installed PEFT and transformers declare about each other (safe_merge/compat/pairs.py), and that
safe-merge keeps merging on a pair transformers' adapter API refuses."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from packaging.requirements import Requirement

import safe_merge
from safe_merge.compat import pairs
from safe_merge.compat.history import History
from tests.helpers import materialize
from tests.release import CONVERTED_AT_LOAD_BUG
from tests.strategies import TINY, Case


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    case = Case(
        "llama", TINY["two_layers"], False, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, "float32", seed=3
    )
    return materialize(case, tmp_path_factory.mktemp("pairs"))


def test_a_min_peft_above_the_installed_one_is_declared_for_the_adapter_api_only(monkeypatch):
    monkeypatch.setattr(pairs, "min_peft_for_adapter_api", lambda: "99.0.0")
    declared = pairs.adapter_api_declaration()
    assert declared is not None and declared.requires == "peft>=99.0.0"
    assert declared.installed == f"peft {importlib.metadata.version('peft')}"
    assert declared.beyond_history and declared.safe_merge_unaffected
    message = declared.message()
    assert "load_adapter" in message and "perhaps not released yet" in message and "merge" in message


def test_a_min_peft_at_or_below_the_installed_one_declares_nothing(monkeypatch):
    monkeypatch.setattr(pairs, "min_peft_for_adapter_api", lambda: importlib.metadata.version("peft"))
    assert pairs.adapter_api_declaration() is None


def test_the_declaration_agrees_with_transformers_own_check():
    """Read from the installed transformers, our declaration exists exactly when its own check refuses the PEFT."""
    needed = pairs.min_peft_for_adapter_api()
    if needed is None:
        pytest.skip("this transformers names no minimum PEFT for its adapter API")
    from transformers.utils.peft_utils import check_peft_version

    try:
        check_peft_version(min_version=needed)
        refused = False
    except ValueError as exc:
        refused = needed in str(exc)
    assert (pairs.adapter_api_declaration() is not None) == refused


def test_an_unmet_requirement_in_peft_metadata_is_declared_with_what_to_install(monkeypatch):
    real = importlib.metadata.requires
    fake = ["transformers>=99.0", "torch; extra == 'never'", "numpy; sys_platform == 'nonexistent'"]
    monkeypatch.setattr(pairs.importlib.metadata, "requires", lambda p: fake if p == "peft" else real(p))
    declared = [d for d in pairs.requirement_declarations(("peft",))]
    assert [d.requires for d in declared] == ["transformers>=99.0"]
    assert not declared[0].safe_merge_unaffected and "pip install 'transformers>=99.0'" in declared[0].message()


def test_the_installed_pair_meets_what_peft_and_transformers_require_of_each_other():
    """pip's own resolution: a cell where PEFT's or transformers' declared requirements are unmet is a bad cell."""
    between = [d for d in pairs.requirement_declarations() if Requirement(d.requires).name in pairs.DECLARERS]
    assert not [d.message() for d in between]


def test_known_bug_windows_name_the_release_that_fixed_them():
    history = History.load()
    names = {b["name"]: b["fixed_in"] for b in history.bugs_in("0.18.1")}
    assert names.get("param_wrapper_assumes_in_out") == "0.19.0"
    assert "dora_embedding_merge_wrong" not in names  # fixed in 0.16.0
    assert "svd_combination_clamps" in {b["name"] for b in history.bugs_in("0.4.0")}
    assert "svd_combination_clamps" not in {b["name"] for b in history.bugs_in("0.5.0")}  # its fix


def test_env_names_the_declared_conflict_and_exits_0(monkeypatch, cli):
    monkeypatch.setattr(pairs, "min_peft_for_adapter_api", lambda: "99.0.0")
    code, report, err = cli("env", "--json")
    assert code == 0 and report["status"] == "attention"
    assert report["versions"]["peft"] == importlib.metadata.version("peft")
    assert report["declarations"][0]["requires"] == "peft>=99.0.0"
    assert "ATTENTION transformers" in err and "peft>=99.0.0" in err


def test_env_on_a_sound_pair_of_a_known_release_says_ok(monkeypatch, cli):
    monkeypatch.setattr(pairs, "declarations", lambda: [])
    monkeypatch.setattr(pairs, "pair_bugs", lambda *args: [])
    code, report, _ = cli("env", "--json")
    release = importlib.metadata.version("peft")
    if History.load().bugs_in(release) or not report["history"]["installed_peft_known"]:
        assert report["status"] == "attention"
    else:
        assert code == 0 and report["status"] == "ok" and report["attention"] == []


def test_merge_warns_of_a_declared_conflict_and_still_merges(monkeypatch, tiny, tmp_path):
    monkeypatch.setattr(pairs, "min_peft_for_adapter_api", lambda: "99.0.0")
    base, adapter = tiny
    report = safe_merge.merge(base, [adapter], tmp_path / "out", backend="peft")
    assert report["status"] == "passed" and report["exit_code"] == 0
    assert any("peft>=99.0.0" in w for w in report["warnings"])
    plan = safe_merge.merge(base, [adapter], tmp_path / "planned", plan=True)
    assert any("peft>=99.0.0" in w for w in plan["warnings"])


def test_on_a_pair_transformers_refuses_its_adapter_api_refuses_and_safe_merge_merges(tiny, tmp_path):
    """The real finding, where the installed pair has it (transformers 5.24.0 with PEFT 0.21.2; any PEFT older
    than its transformers' MIN_PEFT_VERSION): transformers' own adapter API raises, both backends merge."""
    declared = pairs.adapter_api_declaration()
    if declared is None:
        pytest.skip("the installed transformers accepts the installed PEFT for its adapter API")
    import peft
    from transformers import AutoModelForCausalLM

    base, adapter = tiny
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with pytest.raises(ValueError, match="version of PEFT"):
        model.add_adapter(peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for backend in ("peft", "stream"):
        report = safe_merge.merge(base, [adapter], tmp_path / backend, backend=backend)
        assert report["status"] == "passed", report.get("problems")
        assert declared.message() in report["warnings"]


def test_a_pair_bug_covers_its_ranges_and_stops_at_the_fix():
    assert [b["name"] for b in pairs.pair_bugs("0.19.1", "5.17.0")] == ["weight_converter_distributed_operation"]
    assert pairs.pair_bugs("0.20.0", "5.17.0") == []  # the fix
    assert pairs.pair_bugs("0.19.1", "5.5.4") == []  # WeightConverter still took the keyword there
    assert [b["name"] for b in pairs.pair_bugs("0.21.2", "5.0.0")] == ["weight_renaming_loading_info"]
    assert pairs.pair_bugs("0.18.1", "5.0.0") == []  # before PEFT passed loading_info


def test_a_known_pair_bug_met_by_a_merge_is_named_with_the_release_that_fixes_it(tmp_path, cli):
    """On an affected pair (PEFT 0.19.x beside transformers 5.6+; PEFT 0.19+ beside 5.0): PEFT cannot load a LoRA
    onto a fused MoE; the merge says which bug, and what to install, rather than blaming the adapter."""
    if CONVERTED_AT_LOAD_BUG is None:
        pytest.skip("the installed pair has no known bug loading LoRA onto models converted at load")
    import copy

    import peft

    from tests.helpers import save_model
    from tests.moe import tiny_moe

    base = tiny_moe("mixtral", seed=1)
    save_model(base, tmp_path / "base")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    save_model(peft.get_peft_model(copy.deepcopy(base), lora), tmp_path / "adapter")
    code, _, err = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", "--backend", "peft")
    bug = next(b for b in pairs.pair_bugs() if b["scope"] == "converted_at_load")
    assert code == 2 and bug["name"] in err and bug["fixed_in"] in err, err
    assert not (tmp_path / "out").exists()
