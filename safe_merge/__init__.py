"""safe-merge: turn PEFT LoRA adapters into standalone models, and prove the merge is right.

The Python API (each function returns the report `safe-merge COMMAND --json` prints; see safe_merge/api.py):
merge, verify, inspect, migrate, fingerprint, check. `safe_merge.demo.run_demo`
builds the demo's tiny model and adapter and merges them. Importing the package is cheap: torch, transformers
and PEFT are imported when a function first needs them.
"""

from importlib.metadata import PackageNotFoundError, version

from safe_merge.api import check, fingerprint, inspect, merge, migrate, verify
from safe_merge.errors import BadInput, SafeMergeError, Unsupported

try:
    __version__ = version("safe-merge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BadInput",
    "SafeMergeError",
    "Unsupported",
    "check",
    "fingerprint",
    "inspect",
    "merge",
    "migrate",
    "verify",
]
