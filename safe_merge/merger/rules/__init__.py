"""Refusals before any work, one concern per module; merger/preflight.py lists them in the order they run.

A rule is a function that returns nothing or raises a SafeMergeError naming the file, the key and what to do;
``rule(name)`` marks whatever it raises with the rule's name (shown to the user as "refused by rule: NAME").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from safe_merge.errors import SafeMergeError


@contextlib.contextmanager
def rule(name: str) -> Iterator[None]:
    """Run a check as the rule ``name``: a refusal raised inside carries the name."""
    try:
        yield
    except SafeMergeError as exc:
        exc.refused_by(name)
        raise
