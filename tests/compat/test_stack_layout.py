"""A LoRA on MoE expert stacks written by PEFT 0.18.1 (stacks laid out as [E, in, out]) merged by the installed
PEFT: rearranged to its layout where it lays stacks out otherwise, and the merge is PEFT 0.18.1's own, bit for bit
(tests/fixtures/moe-peft-0.18.1, written by tests/fixtures/moe_produce.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file

from safe_merge.compat.expert_stacks import fused_in, taken_as_in_out
from safe_merge.compat.migrations import stack_layout
from tests.helpers import FIXTURES, run_cli
from tests.release import INSTALLED, converted_at_load, has_key

FIXTURE = FIXTURES / "moe-peft-0.18.1"

pytestmark = [
    pytest.mark.skipif(
        not has_key("target_parameters") or not fused_in(Version(transformers.__version__)),
        reason="needs target_parameters (PEFT 0.17+) and fused expert stacks (transformers 5)",
    ),
    converted_at_load,
]


@pytest.mark.parametrize("backend", ["peft", "stream"])
def test_a_peft_0_18_stack_adapter_merges_as_peft_0_18_merged_it(tmp_path, capsys, backend):
    out = tmp_path / "out"
    code, report, err = run_cli(
        capsys, "merge", FIXTURE / "base", FIXTURE / "adapter", "-o", out, "--backend", backend, "--json"
    )
    assert code == 0, err
    steps = [s["id"] for s in report["adapters"][0]["migrations"]]
    rearranged = taken_as_in_out("0.18.1", False) != taken_as_in_out(INSTALLED, False)
    assert (stack_layout.ID in steps) == rearranged, steps
    want, got = load_file(str(FIXTURE / "merged" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
