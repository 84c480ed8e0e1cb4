"""How checkpoints and transformers 4.x name the experts of an MoE block one by one, while transformers 5 fuses
them into stacks (``mlp.experts.gate_up_proj`` [E, 2I, H] over ``mlp.experts.e.gate_proj`` / ``up_proj``): the
table per model type (expert_stacks.json) that the stream backend reads checkpoints with and the per-expert →
stacked adapter migration converts with."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from packaging.version import Version

TABLE = Path(__file__).with_name("expert_stacks.json")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@cache
def _table() -> dict:
    return json.loads(TABLE.read_text(encoding="utf-8"))


def layout_for(model_type: str) -> dict[str, list[str]]:
    """Fused parameter suffix → its pieces' name templates (``{e}`` the expert), for a model type (empty when the
    table has none)."""
    table = _table()
    return table["layouts"].get(table["same_as"].get(model_type, model_type), {})


def stored_in_out(model_type: str) -> bool:
    """Whether transformers stores this model type's expert stacks [E, in, out] (gpt-oss)."""
    return model_type in _table()["stored_in_out"]


def has_stacks(model_type: str) -> bool:
    """Whether the table knows this model type's expert stacks."""
    return bool(layout_for(model_type)) or stored_in_out(model_type)


def fused_in(transformers: Version | None) -> bool:
    """Whether that transformers release builds expert stacks (the first release is in the table)."""
    return transformers is not None and transformers >= Version(_table()["fused_from"])


def expert_count(config) -> int | None:
    """How many routed experts a base config declares (its text config's, for a multimodal model)."""
    for owner in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else None):
        for key in EXPERT_COUNT_KEYS:
            value = (owner or {}).get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def taken_as_in_out(release: str | Version, stored_in_out: bool) -> bool:
    """Whether that PEFT release lays a LoRA on an expert stack out as on a stack stored [E, in, out] (lora_A
    [E·r, out], lora_B [in, r·E]): as the model stores it from 0.19.1; always before 0.19.0; the model's flag read
    the wrong way round in 0.19.0 (history.json boundaries)."""
    from safe_merge.compat.history import History

    history = History.load()
    if history.affected("param_wrapper_assumes_in_out", release):
        return True
    if history.affected("param_wrapper_layout_flag_reversed", release):
        return not stored_in_out
    return stored_in_out


STACK_OWNER = ".experts"  # the module that owns the stacks, in every model type the table knows


def stack_pairs(tensors) -> dict:
    """An adapter's LoRA pairs on expert stacks (keys on an ``…experts`` module or a wrapper of it), by module
    path: {module: {Role.LORA_A: key, Role.LORA_B: key}}."""
    from safe_merge.compat.keys import Role, parse_key

    out: dict = {}
    for key in tensors:
        parsed = parse_key(key)
        if parsed is None or parsed.role not in (Role.LORA_A, Role.LORA_B):
            continue
        owner = parsed.module
        while owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
        if owner.endswith(STACK_OWNER):
            out.setdefault(parsed.module, {})[parsed.role] = key
    return out
