"""Regression fingerprints: one recorded under PEFT 0.21.2 holds in every release that can load its adapter, and
a change to one adapter tensor, or to what the merge does, fails the check naming it.

tests/fixtures/fingerprints/NAME.json were recorded from tests/fixtures with the current pair:
    cd tests/fixtures && safe-merge fingerprint peft-0.21.2/BASE peft-0.21.2/NAME -o fingerprints/NAME.json
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from packaging.version import Version
from safetensors.torch import load_file, save_file

from safe_merge import fingerprints as fp
from safe_merge.cli import main
from tests.helpers import FIXTURES, digest
from tests.release import HISTORY, INSTALLED

RECORDED = sorted((FIXTURES / "fingerprints").glob("*.json"))


def _loadable_here(path: Path) -> bool:
    """The fingerprinted adapter's features are all in the installed release (DoRA arrived in 0.9.0), and the
    release can merge it (0.3.x cannot merge into GPT-2)."""
    recorded = json.loads(path.read_text())
    config = json.loads((path.parent / recorded["adapter"]["relative"] / "adapter_config.json").read_text())
    if config.get("use_dora") and Version(INSTALLED) < Version(HISTORY.entries["use_dora"].first):
        return False
    return not ("gpt2" in recorded["base"]["relative"] and HISTORY.affected("merge_refuses_gpt2", INSTALLED))


@pytest.mark.parametrize("recorded", RECORDED, ids=[p.stem for p in RECORDED])
def test_a_fingerprint_from_0_21_2_holds_in_every_release_that_can_load_the_adapter(recorded, cli):
    before = digest(FIXTURES / "peft-0.21.2")
    code, report, err = cli("check", recorded, "--json")
    if not _loadable_here(recorded):
        assert code == 3 and ("use_dora" in err and "0.9.0" in err or "fixed in 0.4.0" in err), err
        return
    assert code == 0 and report["status"] == "passed", err
    assert report["tensors"]["checked"] > 0 and report["deltas"]["checked"] > 0
    assert report["outputs"]["max_abs"] <= report["outputs"]["tol"]
    assert digest(FIXTURES / "peft-0.21.2") == before  # the inputs are read, never written


def test_a_5_percent_change_in_one_lora_b_fails_naming_the_tensor(tmp_path, cli):
    recorded = FIXTURES / "fingerprints" / "llama-plain.json"
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft-0.21.2" / "llama-plain", adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    name = next(k for k in sorted(tensors) if "v_proj.lora_B" in k)
    tensors[name] = tensors[name] * 1.05
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    code, report, err = cli("check", recorded, "--adapter", adapter, "--json")
    assert code == 1 and report["status"] == "failed", err
    assert f"adapter tensor {name} changed" in report["problems"][0] and "+5.00%" in report["problems"][0]
    # what the merge does moved with it, and the check says where
    assert any("model.layers.0.self_attn.v_proj.weight" in p for p in report["problems"][1:]), report["problems"]


def test_a_changed_merge_fails_naming_the_parameter_even_with_the_same_tensors(tmp_path, cli):
    # same tensors, another lora_alpha: the files' hashes say little, the weight change says which module moved
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft-0.21.2" / "llama-plain", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, report, err = cli("check", FIXTURES / "fingerprints" / "llama-plain.json", "--adapter", adapter, "--json")
    assert code == 1, err
    assert not any(p.startswith("adapter tensor") for p in report["problems"])
    assert any(p.startswith("the merge changes model.layers.0.self_attn.q_proj.weight") for p in report["problems"])
    assert any(p.startswith("output (") for p in report["problems"])
    assert any("adapter files differ" in n for n in report["notes"])


def test_fingerprint_writes_a_complete_file_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "fp.json"
    args = ["fingerprint", FIXTURES / "peft-0.21.2" / "base-llama", FIXTURES / "peft-0.21.2" / "llama-plain"]
    assert main([*map(str, args), "-o", str(out)]) == 0, capsys.readouterr().err
    recorded = fp.read_fingerprint(out)
    assert recorded["recorded_with"]["peft"].startswith(INSTALLED)
    assert set(recorded["adapter"]["tensors"]) == set(
        load_file(str(FIXTURES / "peft-0.21.2" / "llama-plain" / "adapter_model.safetensors"))
    )
    before = out.read_bytes()
    assert main([*map(str, args), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fp.json"]  # no temp file left


@pytest.mark.parametrize(
    ("content", "needle"),
    [("{not json", "not JSON"), ('{"kind": "something else"}', "not a safe-merge fingerprint")],
)
def test_check_refuses_a_file_that_is_not_a_fingerprint(tmp_path, capsys, content, needle):
    path = tmp_path / "fp.json"
    path.write_text(content)
    assert main(["check", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_check_of_a_missing_fingerprint_says_so(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
