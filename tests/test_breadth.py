"""The breadth table's ci rows (tests/breadth/table.toml): merged right with both backends or refused with a
reason, never a defect; `nox -s breadth` runs the whole table."""

from __future__ import annotations

import pytest

from tests.breadth.run import rows, run_row

CI_ROWS = [row for row in rows() if row.get("ci")]


@pytest.mark.parametrize("row", CI_ROWS, ids=[row["name"] for row in CI_ROWS])
def test_a_breadth_row_merges_right_or_is_refused_with_a_reason(row):
    outcomes = run_row(row)
    defects = [f"{o.backend}: {o.detail}" for o in outcomes if o.status == "defect"]
    assert not defects, defects
