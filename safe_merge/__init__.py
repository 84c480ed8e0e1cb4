"""safe-merge: turn PEFT LoRA adapters into standalone models, and prove the merge is right."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("safe-merge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
