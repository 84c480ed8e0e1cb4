"""SIGINT, SIGTERM and SIGHUP end a command the same way: an exception that unwinds through every staging block
(so each removes what it made), one line from the CLI, exit 128 + the signal's number.

Two things make that hold whatever the timing. A signal that arrives during a publish or a cleanup is held until
that step is complete (``deferred``), so a rename is never half done and a staging dir is never half removed. And
once one signal has been turned into an exception, later ones (a second Ctrl-C, `timeout`'s follow-up) are noted
and otherwise ignored: the command is already stopping, and stopping includes its cleanup.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A signal asked the command to stop. A KeyboardInterrupt, so code that cleans up on Ctrl-C cleans up on
    SIGTERM and SIGHUP as well."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.received: int | None = None  # the first signal; set once per command
        self.raised = False
        self.depth = 0  # nesting of deferred sections


_state = _State()


def _handler(signum: int, frame) -> None:
    if _state.received is None:
        _state.received = signum
    if _state.raised or _state.depth:
        return  # stopping already, or inside a step that must finish: raised (once) when the step ends
    _state.raised = True
    raise Interrupted(_state.received)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn the handled signals into Interrupted for the duration of a command (main thread only), then restore
    the handlers that were there before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    _state.__init__()
    _state.installed = True
    for s in HANDLED:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.__init__()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A step that must not be cut in half (a publish, a cleanup): a signal arriving inside is raised when the
    step has finished, unless an exception is already on its way out."""
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    if not _state.depth and _state.received is not None and not _state.raised and _state.installed:
        _state.raised = True
        raise Interrupted(_state.received)
