"""use_rslora scales by alpha/sqrt(r); a release without it scales by alpha/r. Multiplying each module's lora_B
(and its bias) by sqrt(r) keeps scale·B·A the same, so the flag can go."""

from __future__ import annotations

import math

import torch

from safe_merge.compat.keys import Role, parse_key
from safe_merge.compat.migrations.base import Context, State

ID = "rslora-fold-into-lora-b"


def applies(state: State, ctx: Context) -> bool:
    return bool(state.config.get("use_rslora")) and not ctx.history.entries["use_rslora"].present_in(ctx.target)


def apply(state: State, ctx: Context) -> str:
    ranks = {}
    for key, tensor in state.tensors.items():
        parsed = parse_key(key)
        if parsed and parsed.role in (Role.LORA_A, Role.EMBEDDING_A):
            ranks[parsed.module] = int(tensor.shape[0])
    scaled = 0
    for key, tensor in list(state.tensors.items()):
        parsed = parse_key(key)
        if parsed and parsed.role in (Role.LORA_B, Role.EMBEDDING_B, Role.LORA_B_BIAS):
            factor = math.sqrt(ranks[parsed.module])
            state.tensors[key] = (tensor.to(torch.float64) * factor).to(tensor.dtype)
            scaled += 1
    state.config["use_rslora"] = False
    return f"use_rslora folded into {scaled} lora_B tensors (x sqrt(r)); use_rslora → false"
