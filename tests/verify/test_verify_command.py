"""`safe-merge verify` as a command: the weights read one tensor at a time, a bare safetensors directory, the
adapter alone naming its base, the output check on request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import safe_merge
from tests.helpers import materialize
from tests.release import requires_release
from tests.strategies import TINY, Case

pytestmark = requires_release("stream_backend_matches")
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    case = Case(
        "llama", TINY["two_layers"], False, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, "bfloat16", 6
    )
    base, adapter = materialize(case, root)
    report = safe_merge.merge(base, adapter, root / "merged", dtype="bfloat16")
    assert report["status"] == "passed", report["problems"]
    return base, adapter, root / "merged"


def test_the_weights_are_read_one_tensor_at_a_time_and_the_output_check_runs_only_when_asked(merged):
    never = safe_merge.verify(*merged, check_outputs="never")
    assert (never["exit_code"], never["weights_read"]) == (0, "one tensor at a time")
    assert not never["verification"]["outputs"]["ran"]
    assert never["verification"]["weights"]["exact"] == {"merge_and_unload()": 2}
    always = safe_merge.verify(*merged, check_outputs="always")
    assert always["exit_code"] == 0 and always["verification"]["outputs"]["ran"]


def _bare(merged: Path, dest: Path) -> Path:
    shutil.copytree(merged, dest)
    for name in ("config.json", "generation_config.json"):
        (dest / name).unlink(missing_ok=True)
    return dest


def test_a_bare_safetensors_directory_gets_the_weight_checks_and_the_report_says_so(merged, tmp_path):
    base, adapter, out = merged
    report = safe_merge.verify(base, adapter, _bare(out, tmp_path / "bare"))
    assert report["exit_code"] == 0, report["problems"]
    assert "no config.json" in report["verification"]["outputs"]["reason"]
    assert any("no config.json" in w for w in report["warnings"])


def test_a_wrong_merge_in_a_bare_directory_still_fails_naming_the_tensor(merged, tmp_path):
    base, adapter, out = merged
    bare = _bare(out, tmp_path / "bare")
    tensors = load_file(str(bare / "model.safetensors"))
    tensors[Q] = load_file(str(base / "model.safetensors"))[Q].to(tensors[Q].dtype)
    save_file(tensors, str(bare / "model.safetensors"), metadata={"format": "pt"})
    report = safe_merge.verify(base, adapter, bare)
    assert report["exit_code"] == 1
    assert any(p.startswith(Q) and "not applied" in p for p in report["problems"]), report["problems"]


def test_verify_with_the_adapter_alone_uses_the_base_it_names(merged, tmp_path, cli):
    base, adapter, out = merged
    named = shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((named / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (named / "adapter_config.json").write_text(json.dumps(config))
    code, report, _ = cli("verify", named, out, "--check-outputs", "never", "--json")
    assert code == 0 and report["base"]["path"] == str(base)
