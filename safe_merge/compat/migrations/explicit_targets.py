"""Target matching changed between releases (suffix vs dotted suffix vs regex, layer-index regexes,
exclude_modules, "all-linear"). Going down, name the targeted modules exactly, as the weight file shows them,
and drop the rules that selected them."""

from __future__ import annotations

from safe_merge.compat.migrations.base import Context, State

ID = "explicit-target-modules"
SELECTORS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def applies(state: State, ctx: Context) -> bool:
    explicit = sorted(state.targeted_modules())
    return (
        ctx.downgrade
        and bool(explicit)
        and (state.config.get("target_modules") != explicit or any(state.config.get(k) for k in SELECTORS))
    )


def apply(state: State, ctx: Context) -> str:
    explicit = sorted(state.targeted_modules())
    state.config["target_modules"] = explicit
    for key in SELECTORS:
        if key in state.config:
            state.config[key] = None
    return f"target_modules made explicit: {len(explicit)} module paths from the weight keys"
