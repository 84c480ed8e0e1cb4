"""The merged config.json against the base's: edits the weights and the probes cannot see still fail the merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import safe_merge
from safe_merge.verifier.config_check import config_changes
from safe_merge.verifier.probes import probe_inputs
from tests.helpers import materialize
from tests.strategies import TINY, Case


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("config")
    case = Case(
        "llama", TINY["two_layers"], False, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, "float32", 2
    )
    base, adapter = materialize(case, root)
    report = safe_merge.merge(base, adapter, root / "merged")
    assert report["status"] == "passed", report["problems"]
    return base, adapter, root / "merged"


def _edited(merged: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(merged, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _rope(config: dict, **changes) -> None:
    config.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": config.pop("rope_theta", 10000.0)})
    config["rope_parameters"].update(changes)


EDITS = {
    "rope_theta x50": (lambda c: _rope(c, rope_theta=500000.0), "rope_theta"),
    "dynamic NTK x8 (acts only beyond the probes)": (lambda c: _rope(c, rope_type="dynamic", factor=8.0), "rope_type"),
    "rope_theta with max_position_embeddings": (
        lambda c: (_rope(c, rope_theta=40000.0), c.update(max_position_embeddings=4 * c["max_position_embeddings"])),
        "max_position_embeddings",
    ),
    "hidden_act silu -> gelu": (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_verify_fails_a_merged_config_that_changes_the_model(merged, tmp_path, edit):
    base, adapter, out = merged
    change, field = EDITS[edit]
    report = safe_merge.verify(base, adapter, _edited(out, tmp_path, change))
    assert report["status"] == "failed" and report["exit_code"] == 1
    assert any(p.startswith("config.json") and field in p for p in report["problems"]), report["problems"]


def test_what_a_merge_sets_on_purpose_is_not_a_change(merged, tmp_path):
    base, _, out = merged

    def on_purpose(config: dict) -> None:
        config.update(dtype="bfloat16", transformers_version="0.0.1", tie_word_embeddings=False)
        config.pop("quantization_config", None)

    assert config_changes(base, _edited(out, tmp_path, on_purpose)) == []


def test_a_config_rewritten_by_save_pretrained_with_the_same_meaning_passes(merged, tmp_path):
    base, _, out = merged
    # written out in full, every default spelled: the file differs, the model does not
    from transformers import AutoConfig

    full = AutoConfig.from_pretrained(str(out)).to_dict()
    assert config_changes(base, _edited(out, tmp_path, lambda c: c.update(full))) == []


def test_probes_are_as_long_as_the_base_config_allows():
    from types import SimpleNamespace

    short = probe_inputs(SimpleNamespace(vocab_size=10, max_position_embeddings=8))
    long = probe_inputs(SimpleNamespace(vocab_size=10, max_position_embeddings=4096))
    assert short["input_ids"].shape[1] == 8 and long["input_ids"].shape[1] >= 32
