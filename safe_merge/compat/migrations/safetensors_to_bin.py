"""0.3.x looks only for adapter_model.bin: write the tensors as a plain dict, which torch's weights-only loader
reads."""

from __future__ import annotations

from safe_merge.compat.migrations.base import BIN, Context, State

ID = "safetensors-to-bin"


def applies(state: State, ctx: Context) -> bool:
    return state.weight_name != BIN and ctx.target < ctx.history.boundary("reads_safetensors")


def apply(state: State, ctx: Context) -> str:
    state.weight_name = BIN
    return f"weights written as {BIN}: {ctx.target} reads nothing else"
