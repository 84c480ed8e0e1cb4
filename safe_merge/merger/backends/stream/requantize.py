"""--quantized requantize on a base read as stored (quant/stored/): the output keeps the base's format. A
quantized weight the adapter changes is dequantized, merged with PEFT's arithmetic in the model's dtype and
quantized again with fresh scales by the format's codec; its parts are written as their slots come, read back,
and the weight they make is checked against dequant(W) + ΔW within the codec's rounding budget (and must carry
at least half of ΔW). Every other stored tensor, the untouched weights' parts included, is copied byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from safe_merge.io.shards import ShardWriter, Slot
from safe_merge.merger.backends.stream.layout import BaseView
from safe_merge.verifier.delta import merged_weight
from safe_merge.verifier.quantized import requantized_tensor
from safe_merge.verifier.weights import TensorResult

if TYPE_CHECKING:
    from safe_merge.merger.backends.stream.write import StreamMerge, Written

ROUNDING_ULPS = 4  # the merge's own rounding in the model's dtype, before the quantizer's
RULE = (
    "requantized weights: dequantized, against dequant(W)+ΔW within the format's rounding budget per element "
    f"(half a step of its grid at the tile's fresh scale, plus {ROUNDING_ULPS} ulps of the model's dtype), carrying "
    "at least half of ΔW along ΔW; every other stored tensor byte for byte"
)


@dataclass
class _Pending:
    start: torch.Tensor  # dequant(W) in the model's dtype
    values: dict[str, torch.Tensor]  # the parts the codec wrote anew, by role
    back: dict[str, torch.Tensor] = field(default_factory=dict)  # every part as the shards hold it


class Parts:
    """Writes the stored parts of quantized weights, requantizing those the adapter changes."""

    def __init__(self, prep: StreamMerge, check: Callable | None):
        self.prep, self.check = prep, check
        self.base = BaseView(prep.checkpoint, prep.layout)
        self.pending: dict[str, _Pending] = {}

    def emit(self, writer: ShardWriter, slot: Slot, written: Written) -> None:
        from safe_merge.merger.backends.stream.write import merged_tensor

        prep, view = self.prep, self.prep.stored
        group = prep.part(slot.name)
        info = view.stored.tensors[slot.name]
        counts = written.counts
        if group.name not in prep.touched:
            with written.timing("copy"):
                writer.copy(slot.name, slot.dtype, slot.shape, info.file, info.offset)
            counts["copied"] = counts.get("copied", 0) + 1
            return
        state = self.pending.get(group.name)
        if state is None:
            with written.timing("read"):
                start = start_value(prep, self.base, group.name)
            with written.timing("merge"):
                merged = merged_tensor(prep, group.name, start)
                state = _Pending(start, view.codec.quantize(group, merged, view.stored.tensors))
            self.pending[group.name] = state
            counts["requantized"] = counts.get("requantized", 0) + 1
        role = next(r for r, n in group.parts.items() if n == slot.name)
        with written.timing("write"):
            if role in state.values:
                writer.write(slot.name, state.values[role])
            else:  # a part the format keeps as it was (an activation scale, a shape)
                writer.copy(slot.name, slot.dtype, slot.shape, info.file, info.offset)
            state.back[role] = writer.read_back(slot.name)
        if len(state.back) < len(group.parts):
            return
        del self.pending[group.name]
        if self.check is not None:
            with written.timing("verify"):
                self.check(group.name, state.start, view.codec.dequantize(group, state.back, prep.dtype))
        prep.return_pages(group.name)


def start_value(prep: StreamMerge, base: BaseView, name: str) -> torch.Tensor:
    """What a quantized weight's merge starts from: the adapter's saved copy when it replaces the weight, else
    dequant(W), in the model's dtype."""
    saved = prep.ledger.replacements.get(name)
    return saved.to(prep.dtype) if saved is not None else base[name]


def requantized_result(prep: StreamMerge, name: str, start: torch.Tensor, got: torch.Tensor) -> TensorResult:
    """A requantized weight (dequantized from what was written) against dequant(W) + ΔW within the codec's
    rounding budget; a failure it names is the result's problem."""
    group = prep.stored.groups[name]
    lora = prep.ledger.modules.get(name.removesuffix(".weight")) or prep.ledger.modules.get(name)
    origin = start.to(torch.float64)
    exact = merged_weight(origin, lora.widened()) if lora is not None else origin
    rounding = ROUNDING_ULPS * torch.finfo(prep.dtype).eps * (exact.abs() + origin.abs())
    budget = prep.stored.codec.budget(group, exact) + rounding
    result, failure, _ = requantized_tensor(name, start, exact, got, budget)
    if failure:
        result.problem = failure.removeprefix(f"{name}: ")
    return result


def stored_parts(prep: StreamMerge, name: str, checkpoint) -> dict[str, torch.Tensor]:
    """A quantized weight's parts as ``checkpoint`` (a written one) holds them."""
    return {role: checkpoint.read(part) for role, part in prep.stored.groups[name].parts.items()}
