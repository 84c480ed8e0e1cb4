"""``lora_B_layout`` in adapter_config.json: Unsloth marks how it packed lora_B of a LoRA on expert stacks.
``rank_major`` is PEFT's packing (column k·E + e belongs to expert e); ``grouped_by_expert`` is older Unsloth's
(column e·r + k), a permutation of PEFT's that the shapes cannot tell apart. PEFT reads no such key: the columns are
put in PEFT's order (exactly) and the marker removed. An adapter from such an Unsloth without the marker looks like
PEFT's and cannot be told from it."""

from __future__ import annotations

from safe_merge.compat.expert_stacks import expert_count, stack_pairs
from safe_merge.compat.keys import Role
from safe_merge.compat.migrations.base import Context, Refusal, Refused, State

ID = "lora-b-expert-layout"
KEY = "lora_B_layout"
PEFT_ORDER, GROUPED = "rank_major", "grouped_by_expert"


def applies(state: State, ctx: Context) -> bool:
    return KEY in state.config


def apply(state: State, ctx: Context) -> str:
    layout = state.config[KEY]
    if layout not in (PEFT_ORDER, GROUPED, None):
        raise Refusal(
            Refused(KEY, layout, None, f"a packing of lora_B this table does not know ({PEFT_ORDER!r} or {GROUPED!r})")
        )
    pairs = stack_pairs(state.tensors)
    del state.config[KEY]
    if layout != GROUPED or not pairs:
        return f"{KEY} {layout!r}: PEFT's own packing, the marker removed"
    experts = expert_count(ctx.base_config or {})
    if experts is None:
        why = "lora_B grouped by expert must be reordered, and the base model (its expert count) is not known here"
        raise Refusal(Refused(KEY, layout, None, why))
    for roles in pairs.values():
        b = state.tensors[roles[Role.LORA_B]]
        out, packed = b.shape
        state.tensors[roles[Role.LORA_B]] = (
            b.reshape(out, experts, packed // experts).permute(0, 2, 1).reshape(out, packed).contiguous()
        )
    return f"{KEY} {GROUPED!r}: lora_B of {len(pairs)} expert stacks reordered to PEFT's packing (expert-minor)"
