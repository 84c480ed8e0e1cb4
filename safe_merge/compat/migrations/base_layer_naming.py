"""A targeted module's saved base parameters are `X.base_layer.weight|bias` from 0.7 and `X.weight|bias` before;
neither side reads the other's name (the bias or saved embedding is silently lost). Rename to the target's."""

from __future__ import annotations

from safe_merge.compat.keys import PREFIX, Role, parse_key
from safe_merge.compat.migrations.base import Context, State

ID = "base-layer-key-naming"


def _renames(state: State, ctx: Context) -> dict[str, str]:
    targeted = state.targeted_modules()
    new_style = ctx.target >= ctx.history.boundary("targeted_bias_under_base_layer")
    out = {}
    for key in state.tensors:
        parsed = parse_key(key)
        if parsed is None or parsed.module not in targeted or parsed.param is None:
            continue
        leaf = parsed.param.rpartition(".")[2]
        if parsed.role is Role.BASE_LAYER_PARAM and not new_style:
            out[key] = f"{PREFIX}{parsed.module}.{leaf}"
        elif parsed.role is Role.PARAM and new_style and leaf in ("weight", "bias"):
            out[key] = f"{PREFIX}{parsed.module}.base_layer.{leaf}"
    return out


def applies(state: State, ctx: Context) -> bool:
    return bool(_renames(state, ctx))


def apply(state: State, ctx: Context) -> str:
    renames = _renames(state, ctx)
    for old, new in renames.items():
        state.tensors[new] = state.tensors.pop(old)
    example = next(iter(renames.items()))
    return f"{len(renames)} saved base parameters renamed for {ctx.target} (e.g. {example[0]} → {example[1]})"
