"""The stream backend's split of a LoRA on a fused expert stack into plain LoRAs on the pieces the checkpoint
stores: the pieces' deltas, stacked back, are the fused delta the verifier computes (to float64 rounding: the
products are summed by different kernels)."""

from __future__ import annotations

import torch

from safe_merge.merger.backends.stream.experts import Stack, split
from safe_merge.verifier.delta import LayerKind, ModuleLora, low_rank_delta
from safe_merge.verifier.ledger import Ledger


def test_the_pieces_deltas_stack_back_into_the_fused_delta():
    experts, rank, hidden, rows = 3, 2, 8, (5, 5)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(experts * rank, hidden, generator=gen, dtype=torch.float64)
    b = torch.randn(sum(rows), rank * experts, generator=gen, dtype=torch.float64)
    name = "layers.0.mlp.experts.gate_up_proj"
    fused = ModuleLora(name, LayerKind.EXPERTS, a, b, 1.5, param=name, num_experts=experts)
    pieces = tuple(
        (f"layers.0.mlp.experts.{e}.gate_proj.weight", f"layers.0.mlp.experts.{e}.up_proj.weight")
        for e in range(experts)
    )
    ledger = Ledger(modules={name: fused})
    split(ledger, {name: Stack(name, pieces, (experts, sum(rows), hidden), rows)})
    assert name not in ledger.modules
    rebuilt = torch.stack(
        [torch.cat([low_rank_delta(ledger.modules[p.removesuffix(".weight")]) for p in row]) for row in pieces]
    )
    torch.testing.assert_close(rebuilt, low_rank_delta(fused), rtol=1e-13, atol=0)
