"""How PEFT turns a LoRA config into one module's scale: alpha / r, or alpha / sqrt(r) with use_rslora, with
alpha_pattern overriding alpha per module."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping


def pattern_value(patterns: Mapping[str, object], module: str, default):
    """Look a module up in rank_pattern / alpha_pattern the way current PEFT does: first key whose regex matches
    the end of the module path at a dot boundary, in the dict's order."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scaling(config: Mapping, module: str, rank: int) -> float:
    """LoRA's scale for one module: alpha/r, or alpha/sqrt(r) with use_rslora; alpha may come from alpha_pattern.

    The rank is read from the tensors, not from the config: the tensors are what gets multiplied.
    """
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank
