"""What the installed PEFT release can do, for tests that need a feature it may lack: the skip names the release
and the first release that has the feature (from history.json, which a test checks against the wheel)."""

from __future__ import annotations

import inspect

import peft
import pytest
from packaging.version import Version

from safe_merge.compat import pairs
from safe_merge.compat.history import History

INSTALLED = Version(peft.__version__).base_version
HISTORY = History.load()


def has_key(key: str) -> bool:
    """The installed LoraConfig has this field."""
    return HISTORY.entries[key].present_in(INSTALLED)


def requires(*keys: str) -> pytest.MarkDecorator:
    """Skip where the installed LoraConfig lacks one of these fields."""
    missing = [k for k in keys if not has_key(k)]
    reason = ", ".join(f"{k} (first in {HISTORY.entries[k].first})" for k in missing)
    return pytest.mark.skipif(bool(missing), reason=f"peft {INSTALLED} lacks {reason}")


def pair_bug(scope: str) -> str | None:
    """Why the installed PEFT × transformers pair cannot do what ``scope`` names (compat/pair_bugs.json), else
    None: a test skips naming the bug, and tests/compat/test_pairs.py checks that safe-merge names it too."""
    bug = next((b for b in pairs.pair_bugs() if b["scope"] == scope), None)
    return None if bug is None else pairs.pair_bug_message(bug)


CONVERTED_AT_LOAD_BUG = pair_bug("converted_at_load")
# PEFT loading a LoRA onto a model whose weights transformers converts at load (fused MoE expert stacks)
converted_at_load = pytest.mark.skipif(CONVERTED_AT_LOAD_BUG is not None, reason=str(CONVERTED_AT_LOAD_BUG))


def has_combination(combination: str) -> bool:
    first = HISTORY.combination_first(combination)
    return first is not None and first <= Version(INSTALLED)


def combination_param(combination: str):
    """A pytest.param for a combination type, skipped where the installed add_weighted_adapter lacks it."""
    first = HISTORY.combination_first(combination)
    mark = pytest.mark.skipif(
        not has_combination(combination), reason=f"peft {INSTALLED} lacks combination {combination} (first {first})"
    )
    return pytest.param(combination, marks=mark)


def weighted_adapter_options(density: float) -> dict:
    """add_weighted_adapter's density argument, where the installed release takes one (0.9.0+)."""
    model = peft.tuners.lora.LoraModel
    return {"density": density} if "density" in inspect.signature(model.add_weighted_adapter).parameters else {}


def base_layer(module):
    """The layer a LoRA wraps: get_base_layer() from 0.7.0; before, the LoRA layer is the base layer itself."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def requires_release(boundary: str) -> pytest.MarkDecorator:
    """Skip unless the installed PEFT is at or after a history.json boundary's first release."""
    first = HISTORY.boundary(boundary)
    return pytest.mark.skipif(Version(INSTALLED) < first, reason=f"peft {INSTALLED}: {boundary} from {first}")
