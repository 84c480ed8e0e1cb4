"""How a PEFT release's merge rounds, read from history.json: the facts both backends follow and the verifier's
exact tier replays (each with its own arithmetic; only these facts are shared).

A LoRA delta is computed in the precision PEFT holds the factors in (float32 from 0.12, else the model's dtype),
widened to float32 for B @ A where the release does that for half-precision factors on CPU, then added to the
weight. The add is where the two paths differ:

- ``default``, what ``merge_and_unload()`` does (every tutorial's path): ``W += ΔW`` adds the delta in its own
  dtype and rounds once into the weight's dtype, except where the release casts the delta to the weight's dtype
  first (embeddings from 0.16, convolutions in 0.16-0.19, expert stacks always);
- ``peft-safe``, what ``merge_and_unload(safe_merge=True)`` does: ``W + ΔW.to(W.dtype)``, rounding the delta and
  then the sum (from 0.16.0; before, it too adds the delta in its own dtype).

The windows are history.json's ``merge_rounding`` table, per path and layer kind.

In float32 both paths give the same bits; in bfloat16 and float16 they differ in most merged tensors.
"""

from __future__ import annotations

import functools

import torch
from packaging.version import Version

from safe_merge.compat.history import History

ROUNDINGS = {
    "default": "merge_and_unload()",
    "peft-safe": "merge_and_unload(safe_merge=True)",
}


@functools.cache
def rounds_delta_first(release: str, kind: str, rounding: str) -> bool:
    """Whether ``release``'s merge on ``rounding``'s path rounds the delta to the weight's dtype before adding it
    (two roundings) rather than adding it in its own dtype (one). ``kind``: the layer kind's name, as the
    verifier's LayerKind values spell it (linear, embedding, conv, experts, ...)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    windows = History.load().merge_rounding[rounding]
    window = windows.get(kind) or windows.get("*")
    if window is None:
        return False
    at = Version(release)
    return Version(window["first"]) <= at < Version(window.get("until", "9999"))


@functools.cache
def widened(release: str, factor_dtype: torch.dtype) -> bool:
    """Whether ``release`` widens half-precision factors to float32 for B @ A on CPU (float16 always; bfloat16
    from the release history.json names)."""
    if factor_dtype is torch.float16:
        return True
    if factor_dtype is torch.bfloat16:
        return History.load().boundary("bfloat16_delta_widened") <= Version(release)
    return False
