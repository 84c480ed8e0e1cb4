"""Signals in this process: each handled one becomes Interrupted (exit 128 + n), a step marked deferred finishes
first, and once the command is stopping later signals cannot cut its cleanup short."""

from __future__ import annotations

import os
import signal

import pytest

from safe_merge.io.signals import Interrupted, deferred, handle_signals


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_each_handled_signal_becomes_interrupted_with_its_exit_code(signum, code):
    with handle_signals(), pytest.raises(Interrupted) as caught:
        os.kill(os.getpid(), signum)  # the handler runs as soon as the call returns
    assert caught.value.exit_code == code and isinstance(caught.value, KeyboardInterrupt)


def test_a_signal_during_a_deferred_step_is_raised_when_the_step_is_done():
    steps = []
    with handle_signals(), pytest.raises(Interrupted, match="SIGTERM"):
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("renamed")  # the handler ran and returned: the step goes on
            steps.append("marker removed")
        steps.append("never reached")
    assert steps == ["renamed", "marker removed"]


def test_a_second_signal_does_not_cut_the_cleanup_short():
    cleaned = []
    with handle_signals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the first signal should have raised")
        except Interrupted:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again, while cleaning up
            os.kill(os.getpid(), signal.SIGTERM)
            cleaned.append("staging removed")
    assert cleaned == ["staging removed"]


def test_the_previous_handlers_come_back_afterwards():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with handle_signals():
        pass
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_finished_command_leaves_no_pending_signal_behind():
    with handle_signals(), pytest.raises(Interrupted):
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
    steps = []
    with deferred():  # outside a command (the Python API): nothing left over to raise
        steps.append("published")
    assert steps == ["published"]
