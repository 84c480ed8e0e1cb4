"""Weights saved as adapter_model.bin (a pickle, read weights-only) are written as safetensors for every release
that reads them (0.4+), so nobody downstream unpickles anything."""

from __future__ import annotations

from safe_merge.compat.migrations.base import BIN, SAFETENSORS, Context, State

ID = "bin-to-safetensors"


def applies(state: State, ctx: Context) -> bool:
    return state.weight_name == BIN and ctx.target >= ctx.history.boundary("reads_safetensors")


def apply(state: State, ctx: Context) -> str:
    state.weight_name = SAFETENSORS
    return f"weights {BIN} (read with torch's weights-only loader) → {SAFETENSORS}"
