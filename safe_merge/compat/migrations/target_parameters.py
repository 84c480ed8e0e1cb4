"""target_parameters (0.17+) on 2-D Linear weights saves the same keys as targeting the module itself, so for an
older release the modules are named in target_modules instead. 3-D parameters (MoE experts) have no such form."""

from __future__ import annotations

from safe_merge.compat.keys import Role, parse_key
from safe_merge.compat.migrations.base import Context, Refusal, Refused, State

ID = "target-parameters-as-modules"


def applies(state: State, ctx: Context) -> bool:
    return bool(state.config.get("target_parameters")) and not ctx.history.entries["target_parameters"].present_in(
        ctx.target
    )


def apply(state: State, ctx: Context) -> str:
    params = list(state.config["target_parameters"])
    lora_a = {
        p.module: t for p, t in ((parse_key(k), t) for k, t in state.tensors.items()) if p and p.role is Role.LORA_A
    }
    not_linear = [p for p in params if not p.endswith(".weight")]
    not_2d = [m for m, t in lora_a.items() if t.dim() != 2]
    if not_linear or not_2d:
        first = ctx.history.entries["target_parameters"].first
        raise Refusal(Refused("target_parameters", params, first, "targets parameters that are not Linear weights"))
    state.config["target_modules"] = sorted(lora_a)
    state.config["target_parameters"] = None
    return f"target_parameters {params} rewritten as {len(lora_a)} explicit target_modules"
