"""`python -m safe_merge`: the safe-merge command."""

from safe_merge.cli import entry

entry()
