"""Hypothesis profiles and the end-of-run table of measured residuals."""

from __future__ import annotations

import functools
import os

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests import stats

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=5, **_COMMON)
settings.register_profile("ci", max_examples=20, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
# one cell of many: few draws, each cell its own (the matrix sessions pass --hypothesis-seed from the pair, so the
# full tier draws 4 examples per cell and about a hundred distinct ones in all, where 8 derandomized draws repeated
# the same 8 in every cell), and a failure is reported as drawn (shrinking it can take minutes; the blob printed
# with it reproduces it locally, where shrinking is cheap)
_NO_SHRINK = [p for p in Phase if p is not Phase.shrink]
settings.register_profile("matrix", max_examples=4, print_blob=True, phases=_NO_SHRINK, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def cli(capsys):
    """`cli(*args) -> (exit_code, report_or_None, stderr)`: run `safe-merge ARGS...` in this process
    (tests.helpers.run_cli with this test's capsys)."""
    from tests.helpers import run_cli

    return functools.partial(run_cli, capsys)


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the figures to the controller
        session.config.workeroutput["safe_merge_stats"] = stats.dump()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    data = getattr(node, "workeroutput", {}).get("safe_merge_stats")
    if data:
        stats.absorb(data)


def pytest_terminal_summary(terminalreporter):
    lines = stats.table()
    if lines:
        terminalreporter.section("safe-merge: measured residuals")
        for line in lines:
            terminalreporter.write_line(line)
