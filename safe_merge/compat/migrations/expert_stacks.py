"""LoRA on MoE experts one by one (transformers 4.x and vLLM name them ``mlp.experts.e.gate_proj``) for a
transformers that fuses them into stacks (``mlp.experts.gate_up_proj`` [E, 2I, H], from 5.0): rewritten as the
target_parameters LoRA on each stack that has the same meaning, exactly (a reshape; each module's scale folded
into its B). Per expert, the stack's A is the pieces' A rows one above the other, its B the pieces' B block-diagonal;
PEFT packs A expert-major ([E·R, in]) and B expert-minor ([out, R·E]), and nests the wrappers of two stacks of one
module in the order the model registers them, the first innermost. Which pieces make which stack is data
(compat/expert_stacks.json)."""

from __future__ import annotations

import math
import re

import torch

from safe_merge.compat.expert_stacks import expert_count, fused_in, layout_for, taken_as_in_out
from safe_merge.compat.keys import PREFIX, Role, parse_key
from safe_merge.compat.migrations.base import Context, Refusal, Refused, State
from safe_merge.compat.scaling import pattern_value, scaling

ID = "per-expert-lora-to-stacks"


def _layout(ctx: Context) -> dict[str, list[str]]:
    config = ctx.base_config or {}
    if not fused_in(ctx.transformers):
        return {}
    return layout_for(str(config.get("model_type") or ""))


def _pieces(state: State, ctx: Context) -> dict[str, dict[tuple[int, int], str]]:
    """Stack name → {(expert, piece index): module} for every per-expert module the adapter has LoRA on."""
    modules = state.targeted_modules()
    out: dict[str, dict[tuple[int, int], str]] = {}
    for suffix, templates in _layout(ctx).items():
        for index, template in enumerate(templates):
            body = re.escape(template.removesuffix(".weight")).replace(r"\{e\}", r"(?P<e>\d+)")
            pattern = re.compile(rf"^(?P<prefix>.*?){body}$")
            for module in modules:
                match = pattern.match(module)
                if match:
                    out.setdefault(match["prefix"] + suffix, {})[(int(match["e"]), index)] = module
    return out


def applies(state: State, ctx: Context) -> bool:
    return bool(_pieces(state, ctx))


def apply(state: State, ctx: Context) -> str:
    layout = _layout(ctx)
    stacks = _pieces(state, ctx)
    by_module: dict[str, dict[Role, str]] = {}
    for key in state.tensors:
        parsed = parse_key(key)
        if parsed is not None:
            by_module.setdefault(parsed.module, {})[parsed.role] = key
    new: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for stack, pieces in stacks.items():
        owner, _, suffix_leaf = stack.rpartition(".")
        suffix = next(s for s in layout if stack.endswith(s))
        experts = expert_count(ctx.base_config or {}) or 1 + max(e for e, _ in pieces)
        a, b, rank = _stacked(state, by_module, pieces, len(layout[suffix]), experts, stack)
        if taken_as_in_out(ctx.target, stored_in_out=False):  # that release reads the stack as [E, in, out]
            a, b = as_in_out(a, b, experts, rank)
        present = [s for s in layout if (stack[: -len(suffix)] + s) in stacks]
        depth = len(present) - 1 - present.index(suffix)  # PEFT nests a module's stacks, the first innermost
        key = f"{PREFIX}{owner}{'.base_layer' * depth}"
        new[f"{key}.lora_A.weight"], new[f"{key}.lora_B.weight"] = a, b
        ranks[stack] = rank
        for module in pieces.values():
            for tensor_key in by_module[module].values():
                del state.tensors[tensor_key]
    remaining = sorted(state.targeted_modules())  # the modules still targeted as modules
    state.tensors.update(new)
    _rewrite_config(state, layout, ranks, remaining)
    count = sum(len(p) for p in stacks.values())
    return f"LoRA on {count} per-expert modules rewritten as target_parameters on {len(stacks)} expert stacks"


def _stacked(state, by_module, pieces, templates, experts, stack) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The stack's A [E·R, in] and B [out, R·E] (scales folded in, so the stack's own scale is 1), and R."""
    factors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for (e, t), module in pieces.items():
        roles = by_module[module]
        other = sorted(r.value for r in roles if r not in (Role.LORA_A, Role.LORA_B))
        if other or Role.LORA_A not in roles or Role.LORA_B not in roles:
            why = f"{module} carries {other or 'an incomplete LoRA pair'}, which a LoRA on a stack cannot hold"
            raise Refusal(Refused("target_modules", module, None, why))
        a = state.tensors[roles[Role.LORA_A]].to(torch.float32)
        b = state.tensors[roles[Role.LORA_B]].to(torch.float32)
        factors[(e, t)] = (a, b * scaling(state.config, module, int(a.shape[0])))
    rows = {t: b.shape[0] for (_, t), (_, b) in factors.items()}
    width = {a.shape[1] for a, _ in factors.values()}
    if len(rows) != templates or len(width) != 1:
        why = f"the per-expert modules of {stack} do not all have LoRA, or their shapes disagree"
        raise Refusal(Refused("target_modules", sorted(pieces.values())[:3], None, why))
    in_features, out_features = width.pop(), sum(rows.values())
    rank = max(sum(factors[(e, t)][0].shape[0] for t in range(templates) if (e, t) in factors) for e in range(experts))
    a = torch.zeros(experts, rank, in_features)
    b = torch.zeros(out_features, rank, experts)
    for e in range(experts):
        row = col = 0
        for t in range(templates):
            if (e, t) in factors:
                fa, fb = factors[(e, t)]
                a[e, col : col + fa.shape[0]] = fa
                b[row : row + rows[t], col : col + fa.shape[0], e] = fb
                col += fa.shape[0]
            row += rows[t]
    return a.reshape(experts * rank, in_features), b.reshape(out_features, rank * experts), rank


def as_in_out(a: torch.Tensor, b: torch.Tensor, experts: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same deltas in the other layout (stack read as [E, in, out], or back): delta[e] = B_e A_e there is
    (B'_e A'_e)ᵀ here with A'_e = B_eᵀ and B'_e = A_eᵀ, packed expert-major and expert-minor again; the map is its
    own inverse."""
    out_features, in_features = b.shape[0], a.shape[1]
    new_a = b.reshape(out_features, rank, experts).permute(2, 1, 0).reshape(experts * rank, out_features)
    new_b = a.reshape(experts, rank, in_features).permute(2, 1, 0).reshape(in_features, rank * experts)
    return new_a.contiguous(), new_b.contiguous()


def _rewrite_config(state: State, layout: dict[str, list[str]], ranks: dict[str, int], modules: list[str]) -> None:
    config = state.config
    config["target_parameters"] = sorted(set(config.get("target_parameters") or []) | set(layout))
    config["target_modules"] = modules
    rslora = bool(config.get("use_rslora"))
    # each stack's scale is 1 (its alpha its rank, or the rank's square root with rsLoRA: the pieces' scales are
    # in B); the other modules keep the values their patterns gave them
    alphas = {name: (math.sqrt(r) if rslora else r) for name, r in ranks.items()}
    for field, stacks in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        config[field] = _patterns(config.get(field) or {}, stacks, modules, field)


def _patterns(original: dict, stacks: dict, modules: list[str], field: str) -> dict:
    """``original`` with an entry per stack, such that PEFT's lookup (the first key, in the file's sorted order,
    that matches the end of a path) gives each stack its value and every other module what it had. A key of the
    original that would also match a stack ("down_proj" matches ``experts.down_proj``) is replaced by the paths
    of the modules it decided."""
    before = {m: pattern_value(original, m, None) for m in modules}
    kept = {k: v for k, v in original.items() if not any(_matches(k, name) for name in stacks)}
    out = {**kept, **stacks}
    for module in modules:
        if pattern_value(kept, module, None) != before[module] and before[module] is not None:
            out[module] = before[module]
    written = dict(sorted(out.items()))  # as write_state writes it, and PEFT then reads it
    wrong = [n for n, v in {**stacks, **before}.items() if pattern_value(written, n, None) != v]
    if wrong:
        why = f"no {field} gives both the expert stacks and {wrong[0]} the values they need"
        raise Refusal(Refused(field, original, None, why))
    return written


def _matches(key: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", name) is not None
