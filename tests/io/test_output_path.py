"""The output-path rule: never an input, never inside one, never above one, never a replacement without --force."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safe_merge.errors import BadInput
from safe_merge.io.output_path import check_output, check_report


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    base, adapter = tmp_path / "models" / "base", tmp_path / "models" / "adapter"
    for d in (base, adapter):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    return {"base model": base, "adapter": adapter}


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("models/base", "is the base model"),
        ("models/adapter", "is the adapter"),
        ("models/base/merged", "is inside the base model"),
        ("models", "holds the base model"),
        ("models/base/../adapter", "is the adapter"),
    ],
)
@pytest.mark.parametrize("force", [False, True])
def test_an_output_that_is_inside_or_above_an_input_is_refused_even_with_force(tmp_path, inputs, where, needle, force):
    with pytest.raises(BadInput, match=needle):
        check_output(tmp_path / where, inputs, force=force)


def test_symlinks_are_resolved_before_the_rule_is_applied(tmp_path, inputs):
    (tmp_path / "alias").symlink_to(inputs["base model"])
    with pytest.raises(BadInput, match="is the base model"):
        check_output(tmp_path / "alias", inputs, force=True)
    (tmp_path / "up").symlink_to(tmp_path / "models")
    with pytest.raises(BadInput, match="holds the adapter|holds the base model"):
        check_output(tmp_path / "up", inputs, force=True)


def test_a_directory_holding_a_linked_weight_file_cannot_be_replaced_but_may_hold_new_outputs(tmp_path, inputs):
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc123").write_bytes(b"weights")
    (inputs["base model"] / "model.safetensors").symlink_to(blobs / "abc123")
    with pytest.raises(BadInput, match="holds the base model"):
        check_output(tmp_path / "cache", inputs, force=True)
    with pytest.raises(BadInput, match="holds the base model"):
        check_output(blobs, inputs, force=True)
    assert check_output(blobs / "merged", inputs, force=False) == blobs / "merged"


def test_the_current_directory_is_refused_when_it_holds_an_input(tmp_path, inputs, monkeypatch):
    monkeypatch.chdir(tmp_path / "models")
    with pytest.raises(BadInput, match="holds the"):
        check_output(Path("."), inputs, force=True)


def test_an_existing_output_needs_force_and_the_right_kind(tmp_path, inputs):
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="already exists"):
        check_output(tmp_path / "out", inputs, force=False)
    assert check_output(tmp_path / "out", inputs, force=True) == tmp_path / "out"
    with pytest.raises(BadInput, match="not a directory"):
        check_output(tmp_path / "file", inputs, force=True)
    with pytest.raises(BadInput, match="is a directory"):
        check_output(tmp_path / "out", inputs, force=True, kind="file")


def test_relative_paths_are_made_absolute(tmp_path, inputs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output(Path("fresh"), inputs, force=False) == Path(os.path.abspath("fresh"))


def test_a_report_may_not_be_an_input_file_or_overlap_out_but_may_live_inside_out(tmp_path, inputs):
    out = tmp_path / "merged"
    with pytest.raises(BadInput, match="is inside the base model"):
        check_report(inputs["base model"] / "config.json", out, inputs, force=True)
    with pytest.raises(BadInput, match="overlaps -o"):
        check_report(out, out, inputs, force=True)
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(BadInput, match="already exists"):
        check_report(tmp_path / "old.json", out, inputs, force=False)
    assert check_report(out / "report.json", out, inputs, force=False) == out / "report.json"
