"""The version radar's own logic in noxfile.py: what a `latest` role resolves to, how a failure is named, and the
tiers' sizes (the sessions themselves run in CI and by hand)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def noxfile():
    pytest.importorskip("nox")
    spec = importlib.util.spec_from_file_location("safe_merge_noxfile", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_latest_roles_take_the_newest_release_or_the_pinned_current_one(noxfile, monkeypatch):
    newest = {"peft": ["9.0.0", "8.0.0"], "transformers": ["99.0.0", "98.0.0"]}
    monkeypatch.setattr(noxfile, "index_versions", lambda package, pre=False: newest[package])
    current = noxfile.MATRIX["current"]
    pairs = {role: noxfile.resolve_latest(role) for role in noxfile.LATEST_PAIRS}
    assert (pairs["newest"]["peft"], pairs["newest"]["transformers"]) == ("9.0.0", "99.0.0")
    assert (pairs["newest-peft"]["peft"], pairs["newest-peft"]["transformers"]) == ("9.0.0", current["transformers"])
    assert (pairs["newest-transformers"]["peft"], pairs["newest-transformers"]["transformers"]) == (
        current["peft"],
        "99.0.0",
    )


def test_a_latest_failure_is_named_by_its_first_failing_test(noxfile, tmp_path):
    junit = tmp_path / "latest.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="test_passes"/>'
        '<testcase classname="tests.compat.test_history" name="test_table_lists_exactly">'
        '<failure message="AssertionError: peft 0.22.0 has keys history.json has no row for: lora_new&#10;more"/>'
        "</testcase>"
        '<testcase classname="tests.b" name="test_later"><error message="later"/></testcase>'
        "</testsuite></testsuites>"
    )
    named = noxfile._first_failure(junit)
    assert named.startswith("tests.compat.test_history::test_table_lists_exactly") and "lora_new" in named
    assert "more" not in named and "later" not in named
    assert noxfile._first_failure(tmp_path / "absent.xml") == "(pytest wrote no report)"


def test_the_smoke_tier_keeps_at_most_8_cells_and_every_cell_is_listed_once(noxfile):
    cells = [(c["peft"], c["transformers"]) for s in ("cells", "known_bad") for c in noxfile.MATRIX.get(s, [])]
    assert len(cells) == len(set(cells))
    assert 1 <= len(noxfile._cells("smoke")) <= 8
    current = noxfile.MATRIX["current"]
    assert (current["peft"], current["transformers"]) in cells  # the full tier runs the current pair too
