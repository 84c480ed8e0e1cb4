"""init_lora_weights strings an older release does not know: those whose init is overwritten by the saved
weights become `true`; those that rewrite the base weights at load are refused."""

from __future__ import annotations

from packaging.version import Version

from safe_merge.compat.migrations.base import Context, Refusal, Refused, State

ID = "init-lora-weights-value"


def applies(state: State, ctx: Context) -> bool:
    value = state.config.get("init_lora_weights")
    if not isinstance(value, str):
        return False
    info = ctx.history.init_values.get(value.split("_niter_")[0])
    return info is None or ctx.target < Version(info["first"])


def apply(state: State, ctx: Context) -> str:
    value = state.config["init_lora_weights"]
    info = ctx.history.init_values.get(value.split("_niter_")[0])
    if info is None:
        raise Refusal(Refused("init_lora_weights", value, None, "an init value the history table does not know"))
    if info["kind"] != "overwritten":
        raise Refusal(Refused("init_lora_weights", value, info["first"], "this init rewrites the base weights at load"))
    state.config["init_lora_weights"] = True
    return f"init_lora_weights {value!r} → true (the saved weights overwrite that init; {ctx.target} lacks it)"
