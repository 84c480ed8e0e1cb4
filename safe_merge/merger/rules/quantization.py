"""A quantized base: merged only under a policy that allows it, with its library installed, and one adapter at a
time."""

from __future__ import annotations

from pathlib import Path

from safe_merge.errors import BadInput
from safe_merge.quant import formats
from safe_merge.quant.formats import Quantization
from safe_merge.verifier.combination_types import Combination


def quantization_policy(
    quant: Quantization | None, base_dir: Path, policy: str, combination: Combination | None
) -> None:
    if quant is None:
        return
    if policy == "refuse":
        formats.refuse(quant, base_dir / "config.json")
    if quant.stored is None:  # a format read as stored needs no library: quant/stored/ reads it
        formats.require_library(quant, base_dir / "config.json")
    if combination is not None:
        raise BadInput(
            f"the base is quantized ({quant.describe()}); combining adapters on it is not supported",
            path=base_dir / "config.json",
            key="quantization_config",
            hint="merge one adapter at a time, or into the unquantized base",
        )
