"""rank_pattern / alpha_pattern (0.6+) give modules their own rank and alpha. For an older release: zero-pad every
module's A and B to the largest rank (zero rows and columns add nothing to B·A), fold each module's scale into B,
and set r = lora_alpha = that rank, so the release's one scale is 1."""

from __future__ import annotations

import torch

from safe_merge.compat.keys import Role, parse_key
from safe_merge.compat.migrations.base import Context, State
from safe_merge.compat.scaling import scaling

ID = "patterns-fold-into-lora-b"
A_ROLES = (Role.LORA_A, Role.EMBEDDING_A)
B_ROLES = (Role.LORA_B, Role.EMBEDDING_B)


def applies(state: State, ctx: Context) -> bool:
    has_patterns = bool(state.config.get("rank_pattern") or state.config.get("alpha_pattern"))
    return has_patterns and not ctx.history.entries["rank_pattern"].present_in(ctx.target)


def _pad(tensor: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[axis] = size - shape[axis]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)


def apply(state: State, ctx: Context) -> str:
    ranks = {}
    for key, tensor in state.tensors.items():
        parsed = parse_key(key)
        if parsed and parsed.role in A_ROLES:
            ranks[parsed.module] = int(tensor.shape[0])
    top = max(ranks.values())
    for key, tensor in list(state.tensors.items()):
        parsed = parse_key(key)
        if parsed is None or parsed.module not in ranks:
            continue
        scale = scaling(state.config, parsed.module, ranks[parsed.module])
        if parsed.role in A_ROLES:
            state.tensors[key] = _pad(tensor, 0, top)
        elif parsed.role in B_ROLES:
            folded = (tensor.to(torch.float64) * scale).to(tensor.dtype)
            state.tensors[key] = _pad(folded, 1, top)
        elif parsed.role is Role.LORA_B_BIAS:
            state.tensors[key] = (tensor.to(torch.float64) * scale).to(tensor.dtype)
    state.config.update(r=top, lora_alpha=top, rank_pattern={}, alpha_pattern={})
    return f"rank/alpha patterns folded: {len(ranks)} modules padded to r={top}, each scale moved into lora_B"
