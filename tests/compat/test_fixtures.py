"""Adapters written by real PEFT releases (tests/fixtures, `nox -s fixtures`) migrate to the installed release,
load, merge and verify here, and reproduce the logits their producer computed."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file

from safe_merge.compat.adapter_files import load_adapter
from safe_merge.compat.plan import make_plan, write_state
from safe_merge.errors import BadInput
from safe_merge.io import loading
from safe_merge.merger.pipeline import MergeRequest, merge_command
from safe_merge.merger.rules.known_bugs import refuse_known_bugs
from tests.helpers import FIXTURES

INSTALLED = Version(peft.__version__).base_version
CASES = sorted(p.parent for p in FIXTURES.glob("peft-*/*/fixture.json"))


def _logits(model: torch.nn.Module, probe: list) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(probe)).logits.float()


def test_the_fixture_grid_covers_the_releases_the_issue_names():
    releases = {p.name.removeprefix("peft-") for p in FIXTURES.glob("peft-*")}
    assert {"0.4.0", "0.7.1", "0.10.0", "0.13.2", "0.17.1"} <= releases and len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[f"{p.parent.name}/{p.name}" for p in CASES])
def test_fixture_migrates_loads_and_merges_to_its_producers_logits(case, tmp_path):
    meta = json.loads((case / "fixture.json").read_text())
    expected = load_file(str(case / "expected.safetensors"))["logits"]
    base_dir = case.parent / meta["base"]
    plan, state = make_plan(load_adapter(case), INSTALLED)
    if plan.refused:  # going down to an older installed release: only keys it lacks may be refused
        assert all(Version(r["first"]) > Version(INSTALLED) for r in plan.refusals), plan.refusals
        assert Version(meta["peft"]) > Version(INSTALLED), plan.refusals
        return
    migrated = tmp_path / "adapter"
    migrated.mkdir()
    write_state(state, case, migrated)

    reference = loading.load_peft(loading.load_model(base_dir, torch.float32), migrated)
    unmerged = (_logits(reference, meta["probe"]) - expected).abs().max()
    assert unmerged <= 1e-6, f"unmerged logits off the producer's ({meta['peft']}) by {unmerged}"

    try:  # a merge the installed release is known to get wrong is refused, naming the fix (test_known_bugs)
        model_type = loading.read_model_config(base_dir).model_type
        refuse_known_bugs(load_adapter(migrated), INSTALLED, torch.float32, model_type)
    except BadInput as known:
        with pytest.raises(BadInput, match="fixed in") as refused:
            merge_command(MergeRequest(str(base_dir), [str(migrated)], tmp_path / "merged"))
        assert str(refused.value).split("\n  refused by rule:")[0] == str(known)  # the pipeline names the rule
        return
    report = merge_command(MergeRequest(str(base_dir), [str(migrated)], tmp_path / "merged"))
    assert report["status"] == "passed", report["problems"]
    merged = (_logits(loading.load_model(tmp_path / "merged", torch.float32), meta["probe"]) - expected).abs().max()
    assert merged <= report["verification"]["outputs"]["tol"] + unmerged, merged
