"""A LoRA on MoE expert stacks (target_parameters) written by a PEFT that lays stacks out otherwise than the
target release: before 0.19.0 PEFT takes every stack as [E, in, out] (lora_A [E·r, out], lora_B [in, r·E]),
0.19.0 reads the model's flag the wrong way round, 0.19.1 on lays it out as the model stores it. The target reads
such a file with A and B in each other's roles: a size error, or, where a stack is square, a silently different
model. The same deltas in the target's layout are an exact rearrangement: A'_e = B_eᵀ, B'_e = A_eᵀ. The writer is
the adapter's peft_version (0.18+), else the oldest release its keys allow (0.17.x)."""

from __future__ import annotations

from packaging.version import Version

from safe_merge.compat.expert_stacks import expert_count, has_stacks, stack_pairs, stored_in_out, taken_as_in_out
from safe_merge.compat.keys import Role
from safe_merge.compat.migrations.base import Context, Refusal, Refused, State
from safe_merge.compat.migrations.expert_stacks import as_in_out

ID = "expert-stack-layout"


def _writer(state: State, ctx: Context) -> Version:
    written = state.config.get("peft_version")
    try:
        return Version(Version(str(written)).base_version) if written else ctx.origin_lowest
    except ValueError:
        return ctx.origin_lowest


def _disagree(state: State, ctx: Context) -> bool:
    if not state.config.get("target_parameters") or not stack_pairs(state.tensors):
        return False
    model_type = str((ctx.base_config or {}).get("model_type") or "")
    in_out = stored_in_out(model_type)
    return taken_as_in_out(_writer(state, ctx), in_out) != taken_as_in_out(ctx.target, in_out)


def applies(state: State, ctx: Context) -> bool:
    return ctx.base_config is not None and _disagree(state, ctx)


def apply(state: State, ctx: Context) -> str:
    config = ctx.base_config or {}
    model_type = str(config.get("model_type") or "")
    experts = expert_count(config)
    writer = _writer(state, ctx)
    if not has_stacks(model_type) or experts is None:
        why = (
            f"written by PEFT {writer}, which lays LoRA on expert stacks out otherwise than PEFT {ctx.target}; "
            f"how {model_type or 'this model'} stores its stacks is not in compat/expert_stacks.json"
        )
        raise Refusal(Refused("peft_version", state.config.get("peft_version"), None, why))
    pairs = stack_pairs(state.tensors)
    for roles in pairs.values():
        a, b = state.tensors[roles[Role.LORA_A]], state.tensors[roles[Role.LORA_B]]
        rank = a.shape[0] // experts
        state.tensors[roles[Role.LORA_A]], state.tensors[roles[Role.LORA_B]] = as_in_out(a, b, experts, rank)
    return (
        f"{len(pairs)} LoRA pairs on expert stacks rearranged from PEFT {writer}'s layout to PEFT {ctx.target}'s "
        "(A and B exchange roles, expert by expert)"
    )
