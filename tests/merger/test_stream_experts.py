"""The stream backend's split of a LoRA on a fused expert stack into plain LoRAs on the pieces the checkpoint
stores: the pieces' deltas, stacked back, are the fused delta the verifier computes (to float64 rounding: the
products are summed by different kernels)."""

from __future__ import annotations

import pytest
import torch

from safe_merge.merger.backends.stream.experts import Stack, split
from safe_merge.verifier.delta import LayerKind, ModuleLora, low_rank_delta
from safe_merge.verifier.ledger import Ledger


@pytest.mark.parametrize("kind", [LayerKind.EXPERTS, LayerKind.EXPERTS_T])
def test_the_pieces_deltas_stack_back_into_the_fused_delta(kind):
    """EXPERTS_T: the stack as PEFT before 0.19.1 reads it ([E, in, out]: A [E·r, out], B [in, r·E])."""
    experts, rank, hidden, rows = 3, 2, 8, (5, 5)
    gen = torch.Generator().manual_seed(0)
    a_cols, b_rows = (hidden, sum(rows)) if kind is LayerKind.EXPERTS else (sum(rows), hidden)
    a = torch.randn(experts * rank, a_cols, generator=gen, dtype=torch.float64)
    b = torch.randn(b_rows, rank * experts, generator=gen, dtype=torch.float64)
    name = "layers.0.mlp.experts.gate_up_proj"
    fused = ModuleLora(name, kind, a, b, 1.5, param=name, num_experts=experts)
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
