"""Errors that end a command, each with the exit code the command contract gives it."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_COULD_NOT_VERIFY = 3
EXIT_PUSH_FAILED = 4  # merged, verified and written locally; the upload to the hub failed (push it again)


class SafeMergeError(Exception):
    """Base class: carries the exit code so the CLI never has to guess it; the message says which file, which key
    and what to do."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, path: object = None, key: str | None = None, hint: str | None = None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if key is not None:
            parts.append(f"key {key!r}")
        where = ": ".join(parts)
        text = f"{where}: {message}" if where else message
        if hint:
            text = f"{text}\n  what to do: {hint}"
        super().__init__(text)
        self.path = path
        self.key = key
        self.hint = hint
        self.rule: str | None = None  # the preflight rule that refused, when one did

    def refused_by(self, rule: str) -> None:
        """Name the rule that raised this (the innermost rule wins), so the user can look it up."""
        if self.rule is None:
            self.rule = rule
            self.args = (f"{self.args[0]}\n  refused by rule: {rule}", *self.args[1:])


class BadInput(SafeMergeError):
    """The user's input cannot be used as it is."""


class Unsupported(SafeMergeError):
    """The input is valid but uses something safe-merge cannot check; never reported as a pass."""

    exit_code = EXIT_COULD_NOT_VERIFY
