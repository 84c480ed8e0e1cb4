"""Unsloth's lora_B_layout marker on a LoRA on expert stacks: lora_B grouped by expert is reordered to PEFT's
packing, exactly; PEFT's own packing only loses the marker (PEFT reads no such key); anything else is refused
naming it. On the PEFT 0.18.1 fixture, whose merge by 0.18.1 itself is the reference."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file, save_file

from safe_merge.compat.expert_stacks import fused_in
from safe_merge.compat.migrations import lora_b_layout
from tests.helpers import FIXTURES, merge_refused, run_cli
from tests.release import converted_at_load, has_key

FIXTURE = FIXTURES / "moe-peft-0.18.1"
EXPERTS = 4

pytestmark = [
    pytest.mark.skipif(
        not has_key("target_parameters") or not fused_in(Version(transformers.__version__)),
        reason="needs target_parameters (PEFT 0.17+) and fused expert stacks (transformers 5)",
    ),
    converted_at_load,
]


def _marked(tmp_path, layout: str):
    """The fixture's adapter with the marker, its lora_B of every stack packed as the marker says."""
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURE / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_B_layout": layout}))
    if layout == "grouped_by_expert":
        weights = adapter / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        for key in [k for k in tensors if ".experts." in k and "lora_B" in k]:
            out, packed = tensors[key].shape  # PEFT's column k·E + e becomes e·r + k
            grouped = tensors[key].reshape(out, packed // EXPERTS, EXPERTS).permute(0, 2, 1)
            tensors[key] = grouped.reshape(out, packed).contiguous()
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return adapter


@pytest.mark.parametrize("layout", ["rank_major", "grouped_by_expert"])
def test_a_marked_adapter_merges_as_peft_merged_the_unmarked_one(tmp_path, capsys, layout):
    adapter = _marked(tmp_path, layout)
    out = tmp_path / "out"
    code, report, err = run_cli(capsys, "merge", FIXTURE / "base", adapter, "-o", out, "--json")
    assert code == 0, err
    assert lora_b_layout.ID in [s["id"] for s in report["adapters"][0]["migrations"]]
    want, got = load_file(str(FIXTURE / "merged" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_an_unknown_lora_b_layout_is_refused_naming_it(tmp_path, capsys):
    adapter = _marked(tmp_path, "column_major")
    merge_refused(tmp_path, capsys, [FIXTURE / "base", adapter], [], 'lora_B_layout = "column_major"', "does not know")
