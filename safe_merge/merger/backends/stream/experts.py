"""MoE expert stacks the checkpoint stores per expert while the model (and a target_parameters adapter) sees
them fused: ``mlp.experts.gate_up_proj`` [E, 2I, H] is, per expert e, ``mlp.experts.e.gate_proj.weight`` [I, H]
over ``mlp.experts.e.up_proj.weight`` [I, H]. Which pieces make which stack is data (compat/expert_stacks.json).

A LoRA on a stack is, for each piece, a plain Linear LoRA: expert e's A rows (A is [E·r, in], expert-major) and
the piece's rows of expert e's B columns (B is [out, r·E], expert-minor). So the stream backend merges and checks
piece by piece, its memory still bounded by the largest stored tensor, and the product per expert has the bits
PEFT's einsum over all experts has (measured).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from safe_merge.compat.expert_stacks import layout_for
from safe_merge.io.checkpoint import Checkpoint
from safe_merge.verifier.delta import LayerKind, ModuleLora
from safe_merge.verifier.ledger import Ledger


@dataclass(frozen=True)
class Stack:
    """A fused expert parameter and the stored tensors it is made of: pieces[e] lists expert e's, in order."""

    name: str
    pieces: tuple[tuple[str, ...], ...]
    shape: tuple[int, int, int]
    rows: tuple[int, ...]  # rows each piece contributes (the same for every expert)


def find_stacks(checkpoint: Checkpoint, model_type: str) -> dict[str, Stack]:
    """Every fused expert parameter whose pieces the checkpoint stores, by its in-memory name."""
    stacks = {}
    for suffix, templates in layout_for(model_type).items():
        first = re.compile("^(?P<prefix>.*?)" + re.escape(templates[0]).replace(r"\{e\}", r"(?P<e>\d+)") + "$")
        prefixes: dict[str, set[int]] = {}
        for name in checkpoint.tensors:
            match = first.match(name)
            if match:
                prefixes.setdefault(match["prefix"], set()).add(int(match["e"]))
        for prefix, experts in prefixes.items():
            count = len(experts)
            if experts != set(range(count)):
                continue  # not a contiguous stack of experts: left as it is stored
            pieces = tuple(tuple(prefix + t.format(e=e) for t in templates) for e in range(count))
            if not all(p in checkpoint.tensors for row in pieces for p in row):
                continue
            shapes = [checkpoint.tensors[p].shape for p in pieces[0]]
            if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
                continue
            rows = tuple(int(s[0]) for s in shapes)
            stacks[prefix + suffix] = Stack(prefix + suffix, pieces, (count, sum(rows), int(shapes[0][1])), rows)
    return stacks


def split(ledger: Ledger, stacks: dict[str, Stack]) -> None:
    """Replace each LoRA on a stored-per-expert stack by plain Linear LoRAs on its pieces."""
    for name, stack in stacks.items():
        lora = ledger.modules.get(name)
        if lora is None or not lora.kind.experts:
            continue
        del ledger.modules[name]
        for e, pieces in enumerate(stack.pieces):
            start = 0
            for piece, rows in zip(pieces, stack.rows, strict=True):
                module = piece.removesuffix(".weight")
                a, b = _piece_factors(lora, stack.shape[0], e, start, rows)
                ledger.modules[module] = ModuleLora(
                    module, LayerKind.LINEAR, a, b, lora.scale, compute_dtype=lora.compute_dtype, rounds_like=lora.kind
                )
                start += rows


def _piece_factors(lora: ModuleLora, experts: int, e: int, start: int, rows: int):
    """(A, B) of the plain LoRA whose delta is rows [start, start + rows) of expert e's slice of the stack's.

    A is [E·r, a] expert-major and B [b, r·E] expert-minor; expert e's delta is B_e A_e [b, a] (EXPERTS), or its
    transpose (EXPERTS_T: the stack taken as [E, in, out]), whose rows are then A_e's columns."""
    per_a = lora.a.reshape(experts, -1, lora.a.shape[-1])[e]  # [r, a]
    per_b = lora.b.reshape(lora.b.shape[0], -1, experts)[:, :, e]  # [b, r]
    if lora.kind is LayerKind.EXPERTS:
        return per_a.contiguous(), per_b[start : start + rows].contiguous()
    return per_b.T.contiguous(), per_a[:, start : start + rows].T.contiguous()
