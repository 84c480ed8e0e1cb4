"""merge BASE A1 A2 ... --weights ... --combination TYPE: every type the installed PEFT has passes the verifier,
a combination that is not what its type means is caught, and what cannot be combined is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

from safe_merge.compat.history import History
from safe_merge.io import loading
from safe_merge.merger import weighted_adapter
from safe_merge.verifier.combination_types import SAME_RANK, SVD, UNCHECKABLE
from tests.helpers import digest, merge_refused, save_adapter, save_model
from tests.release import has_combination, requires
from tests.strategies import TINY, Case, build_base

SIZES = TINY["two_layers"]
INSTALLED = loading.installed_peft()
TYPES = sorted(t for t in History.load().combination_types if History.load().combination_first(t) <= Version(INSTALLED))
CHECKABLE = [t for t in TYPES if t not in UNCHECKABLE]
HISTORY = History.load()
NEGATIVE_OK = Version(INSTALLED) >= HISTORY.boundary("negative_combination_weights")
SVD_SCALED_TWICE = HISTORY.affected("svd_combination_scale_twice", INSTALLED)
DARE_UNSCALED = HISTORY.affected("dare_rescale_missing", INSTALLED)
PRUNING = {"ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune", "magnitude_prune_svd"}
# the adapters below target different modules, which releases before 0.6.0 cannot combine (refused there:
# test_known_bugs); those cells test combining through test_combine and the property test
pytestmark = pytest.mark.skipif(
    HISTORY.affected("combination_needs_same_targets", INSTALLED) or not has_combination("cat"),
    reason=f"peft {INSTALLED} cannot combine these adapters (different modules need 0.6.0, the default cat 0.5.0)",
)
ADAPTERS = {
    # the first one is rsLoRA: releases that give the combined adapter its use_rslora overscale it
    "rs": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    "plain": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "down_proj"]},
    "third": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    "r8": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "dora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True},
    "head": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "pattern": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "alpha_pattern": {"q_proj": 2}},
    "layer0": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("several")
    case = Case("llama", SIZES, False, {}, "float32", seed=21)
    base = build_base(case)
    save_model(base, root / "base")
    out = {"base": root / "base"}
    for i, (name, lora) in enumerate(ADAPTERS.items()):
        save_adapter(Case("llama", SIZES, False, lora, "float32", seed=30 + i), base, root / name)
        out[name] = root / name
    return out


def _density(combination: str) -> list[str]:
    return ["--density", "0.5"] if combination in PRUNING else []


@pytest.mark.parametrize("combination", CHECKABLE)
def test_each_combination_type_of_three_adapters_passes_the_verifier(models, tmp_path, combination, cli):
    sources = [models["rs"], models["plain"], models["third"]]
    before = digest(*sources)
    out = tmp_path / "out"
    weights = ["0.7", "-0.4" if NEGATIVE_OK or combination not in SAME_RANK else "0.4", "1.1"]
    args = [models["base"], *sources, "-o", out, "--weights", *weights, "--combination", combination]
    code, report, err = cli("merge", *args, *_density(combination), "--json")
    if SVD_SCALED_TWICE and combination in SVD:  # adapters with scale 4: refused on these releases
        assert code == 2 and "applies each adapter's scale twice" in err, err
        return
    if DARE_UNSCALED and combination.startswith("dare"):
        assert code == 2 and "drops DARE's 1/density rescale" in err, err
        return
    assert code == 0, err
    check = report["verification"]["combination"]
    assert check["passed"] and check["modules_checked"] == 10 and not check["gaps"]  # q,k,v,up,down × 2 layers
    assert [a["weight"] for a in report["adapters"]] == [float(w) for w in weights]
    assert all(a["ledger"]["merged"] > 0 and a["ledger"]["unmatched"] == 0 for a in report["adapters"])
    assert report["verification"]["outputs"]["passed"] and report["verification"]["weights"]["passed"]
    assert f"combine   {combination} of 3 adapters" in err
    assert digest(*sources) == before
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


def test_an_rslora_first_adapter_does_not_overscale_the_combination(models, tmp_path, cli):
    code, report, err = cli("merge", models["base"], models["rs"], models["plain"], "-o", tmp_path / "o", "--json")
    assert code == 0, err
    fixed = [w for w in report["warnings"] if "combined adapter with scaling" in w]
    # PEFT releases that pass use_rslora on to the combined adapter scale it by sqrt(r) = 2; safe-merge sets it to 1
    assert not fixed or "scaling 2" in fixed[0]


@requires("use_rslora")
def test_a_combined_adapter_left_overscaled_fails_verification(models, tmp_path, cli, monkeypatch):
    def overscale(peft_model):  # what PEFT 0.21.2 leaves when the first adapter is rsLoRA
        peft_model.peft_config[weighted_adapter.COMBINED].use_rslora = True
        return []

    monkeypatch.setattr(weighted_adapter, "_unit_scaling", overscale)
    work = tmp_path / "work"
    work.mkdir()
    code, report, err = cli("merge", models["base"], models["plain"], models["third"], "-o", work / "out", "--json")
    assert code == 1, err
    assert any(
        p.startswith("combination: model.layers.0.self_attn.q_proj: combined delta off") for p in report["problems"]
    )
    assert list(work.iterdir()) == []


def _tamper(monkeypatch, change) -> None:
    """Let PEFT combine, then change the saved combined adapter's tensors before they are checked and merged."""
    real = weighted_adapter.combine

    def tampered(model, adapter_dirs, combination, out_dir):
        notes = real(model, adapter_dirs, combination, out_dir)
        path = out_dir / "adapter_model.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))
        return notes

    monkeypatch.setattr(weighted_adapter, "combine", tampered)


DARE = sorted({"dare_linear", "dare_ties"} & set(TYPES)) if not DARE_UNSCALED else []


@pytest.mark.parametrize("combination", DARE)
def test_a_dare_entry_no_mask_can_produce_fails_verification(models, tmp_path, cli, monkeypatch, combination):
    def nudge(tensors):
        key = next(k for k in tensors if k.endswith("layers.1.self_attn.v_proj.lora_A.weight"))
        tensors[key][0, 0] += 0.05 * float(tensors[key].abs().max())

    _tamper(monkeypatch, nudge)
    args = [models["base"], models["rs"], models["third"], "-o", tmp_path / "o", "--combination", combination]
    code, report, err = cli("merge", *args, *_density(combination), "--json")
    assert code == 1, err
    assert any("v_proj: 1 of" in p and "no masked combination" in p for p in report["problems"]), report["problems"]


@pytest.mark.parametrize("combination", DARE)
def test_a_dare_combination_that_kept_nothing_fails_verification(models, tmp_path, cli, monkeypatch, combination):
    def zero(tensors):  # every entry is then "the empty subset": only the share of kept positions can tell
        for key in tensors:
            tensors[key].zero_()

    _tamper(monkeypatch, zero)
    args = [models["base"], models["rs"], models["third"], "-o", tmp_path / "o", "--combination", combination]
    code, report, err = cli("merge", *args, *_density(combination), "--json")
    assert code == 1, err
    assert any("positions" in p and "keeps at least" in p for p in report["problems"]), report["problems"]
    assert report["output"]["path"] is None


@pytest.mark.parametrize("combination", DARE)
def test_dare_that_kept_every_entry_fails_the_density_check(models, tmp_path, cli, monkeypatch, combination):
    # every entry kept (and rescaled by 1/density) is a value some mask gives, but not at density 0.5
    monkeypatch.setattr(torch, "bernoulli", lambda t, *a, **k: torch.ones_like(t))
    args = [models["base"], models["rs"], models["third"], "-o", tmp_path / "o", "--combination", combination]
    code, report, err = cli("merge", *args, *_density(combination), "--json")
    assert code == 1, err
    share = "keep 100.0%" if combination == "dare_linear" else "at density 0.5 keeps at most 50%"
    assert any(share in p for p in report["problems"]), report["problems"]


@pytest.mark.skipif(SVD_SCALED_TWICE, reason="svd of these adapters is refused on this release (tested below)")
def test_an_svd_combination_of_other_weights_fails_verification(models, tmp_path, cli, monkeypatch):
    real = weighted_adapter.combine

    def other_weights(model, adapter_dirs, combination, out_dir):
        from dataclasses import replace

        return real(model, adapter_dirs, replace(combination, weights=(0.7, -0.3)), out_dir)

    monkeypatch.setattr(weighted_adapter, "combine", other_weights)
    args = [models["base"], models["plain"], models["third"], "-o", tmp_path / "o", "--weights", "0.7", "-0.4"]
    code, report, err = cli("merge", *args, "--combination", "svd", "--json")
    assert code == 1, err
    assert any("combined delta off what svd of the adapters means" in p for p in report["problems"])


def test_one_adapter_with_a_weight_merges_that_share_of_its_delta(models, tmp_path, cli):
    code, report, err = cli(
        "merge", models["base"], models["plain"], "-o", tmp_path / "o", "--weights", "0.5", "--json"
    )
    assert code == 0, err
    assert report["combination"]["weights"] == [0.5] and report["verification"]["combination"]["passed"]


def test_the_plan_lists_every_adapter_with_its_weight_and_the_combination_check(models, tmp_path, cli):
    args = [models["base"], models["rs"], models["plain"], "-o", tmp_path / "o", "--plan", "--weights", "1", "2"]
    code, report, err = cli("merge", *args, "--json")
    assert code == 0 and report["status"] == "planned" and list(tmp_path.iterdir()) == []
    assert [a["weight"] for a in report["adapters"]] == [1.0, 2.0] and report["combination"]["type"] == "cat"
    assert report["checks"][0].startswith("the combined adapter against what cat")


def _refused(models, tmp_path, capsys, names, extra, *needles, code=2) -> None:
    merge_refused(tmp_path, capsys, [models["base"], *(models[n] for n in names)], extra, *needles, code=code)


def test_linear_refuses_adapters_of_different_ranks(models, tmp_path, capsys):
    _refused(models, tmp_path, capsys, ["plain", "r8"], ["--combination", "linear"], "needs one rank", "r=8", "cat")


@requires("use_dora")
def test_dora_adapters_are_refused_naming_the_tensor(models, tmp_path, capsys):
    _refused(models, tmp_path, capsys, ["plain", "dora"], [], "DoRA magnitude", "lora_magnitude_vector")


def test_saved_modules_are_refused(models, tmp_path, capsys):
    _refused(models, tmp_path, capsys, ["plain", "head"], [], "modules_to_save", "lm_head")


def test_different_layer_selections_are_refused(models, tmp_path, capsys):
    _refused(models, tmp_path, capsys, ["plain", "layer0"], [], "layers_to_transform", "select layers differently")


def _trained_on(models, tmp_path, **bases: str) -> dict[str, Path]:
    """Copies of the named adapters whose configs say they were trained on the given base."""
    renamed = dict(models)
    for name, base in bases.items():
        renamed[name] = tmp_path / name
        renamed[name].mkdir()
        for f in models[name].iterdir():
            (renamed[name] / f.name).write_bytes(f.read_bytes())
        config = json.loads((renamed[name] / "adapter_config.json").read_text())
        (renamed[name] / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    return renamed


def test_adapters_of_different_bases_are_refused(models, tmp_path, capsys):
    local = f"{tmp_path / 'models' / 'Llama-2-7b-hf'}/"
    renamed = _trained_on(models, tmp_path, plain=local, third="org/mistral-7b")
    _refused(renamed, tmp_path, capsys, ["plain", "third"], [], "different base models", "org/mistral-7b")


def test_a_hub_id_and_a_local_copy_of_it_count_as_one_base(models, tmp_path, cli):
    local = f"{tmp_path / 'models' / 'Llama-2-7b-hf'}/"  # a local copy, named by its directory
    renamed = _trained_on(models, tmp_path, plain=local, third="meta-llama/Llama-2-7b-hf")
    code, _, err = cli("merge", models["base"], renamed["plain"], renamed["third"], "-o", tmp_path / "o", "--json")
    assert code == 0, err


def test_a_type_the_installed_peft_lacks_is_refused_naming_its_first_release(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.8.2")
    args = ["--combination", "ties", "--density", "0.5"]
    _refused(models, tmp_path, capsys, ["plain", "third"], args, "not in the installed PEFT 0.8.2", "arrived in 0.9.0")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--weights", "1"], "1 weights for 2 adapters"),
        (["--combination", "ties"], "needs --density"),
        (["--combination", "cat", "--density", "0.5"], "--density has no effect on combination cat"),
        (["--combination", "ties", "--density", "1.5"], "outside (0, 1]"),
        (["--combination", "average"], "unknown combination type 'average'"),
        (["--combination", "linear", "--svd-rank", "2"], "--svd-rank 2 needs"),
    ],
)
def test_bad_combination_arguments_are_refused(models, tmp_path, capsys, extra, needle):
    _refused(models, tmp_path, capsys, ["plain", "third"], extra, needle)


@pytest.mark.parametrize("combination", sorted(UNCHECKABLE & set(TYPES)))
def test_dare_svd_types_are_refused_as_uncheckable(models, tmp_path, capsys, combination):
    args = ["--combination", combination, "--density", "0.5"]
    _refused(models, tmp_path, capsys, ["plain", "third"], args, "cannot be checked", code=3)


def test_an_svd_rank_larger_than_a_module_is_refused_naming_the_module(models, tmp_path, capsys):
    args = ["--combination", "svd", "--svd-rank", "20"]
    _refused(models, tmp_path, capsys, ["plain", "third"], args, "cuts every module to rank 20", "--svd-rank 16")


def test_negative_weights_on_a_release_that_cannot_take_them_are_refused(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.17.1")
    args = ["--combination", "linear", "--weights", "1", "-0.5"]
    _refused(models, tmp_path, capsys, ["plain", "third"], args, "needs PEFT 0.19.0 or newer")


def test_svd_on_a_release_that_scales_twice_is_refused_naming_the_fix(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.17.1")
    args = ["--combination", "svd"]
    _refused(models, tmp_path, capsys, ["plain", "third"], args, "scale twice", "scale 4", "fixed in 0.21.0")


def test_dare_on_a_release_that_drops_the_rescale_is_refused(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.17.1")
    args = ["--combination", "dare_linear", "--density", "0.5"]
    _refused(models, tmp_path, capsys, ["plain", "third"], args, "drops DARE's 1/density rescale", "fixed in 0.19.0")


def test_patterns_first_on_a_release_that_passes_them_on_are_refused(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "installed_peft", lambda: "0.13.2")
    _refused(models, tmp_path, capsys, ["pattern", "third"], [], "first adapter's rank_pattern", "fixed in 0.16.0")


def test_patterns_first_combine_right_on_a_release_that_resets_them(models, tmp_path, cli):
    if HISTORY.affected("combined_adapter_inherits_patterns", INSTALLED):
        pytest.skip("refused on this release (tested above)")
    code, report, err = cli("merge", models["base"], models["pattern"], models["third"], "-o", tmp_path / "o", "--json")
    assert code == 0, err
