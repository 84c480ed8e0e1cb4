"""PEFT's merge arithmetic, operation for operation, so that the stream backend's result is bit-identical to
merge_and_unload() on CPU (by default; to merge_and_unload(safe_merge=True) with rounding "peft-safe").

Read from PEFT's lora layers: the factors are held in ``factor_dtype`` (float32 from 0.12 on; before, the model's
dtype); a half-precision delta is computed in float32 (bfloat16 only from 0.13) and rounded back to it; the delta
is laid out like the weight (transposed for fan_in_fan_out and embeddings), scaled, and added to the weight:
in its own dtype, rounding once, or rounded to the weight's dtype first, as compat/rounding.py says for the
release, the path and the layer kind. DoRA rescales W + ΔW by m / ‖W + ΔW‖ per output feature, computed in the
delta's precision. A lora_B bias enters as b + s·b_B, rounded to the weight's dtype.

The element-wise steps are done a block of rows at a time (the same values, with cache-sized temporaries); the
verifier has its own reference and shares none of this.
"""

from __future__ import annotations

import torch

from safe_merge.compat import rounding as facts
from safe_merge.io.buffers import Buffers
from safe_merge.io.loading import installed_peft
from safe_merge.verifier.delta import LayerKind, ModuleLora

BLOCK_BYTES = 2**21  # rows per block of the plain merge: about 2 MiB of the product, inside a core's cache


def factors(lora: ModuleLora, factor_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B as the merging PEFT holds them, then as it multiplies them."""
    a, b = lora.a.to(factor_dtype), lora.b.to(factor_dtype)
    if facts.widened(installed_peft(), factor_dtype):
        a, b = a.float(), b.float()
    return a, b


def delta(lora: ModuleLora, factor_dtype: torch.dtype) -> torch.Tensor:
    """PEFT's get_delta_weight."""
    a, b = factors(lora, factor_dtype)
    product = b @ a
    if lora.kind in (LayerKind.LINEAR_FIFO, LayerKind.EMBEDDING):
        product = product.T
    out = product * lora.scale
    return out.to(factor_dtype)


def merge_weight(
    weight: torch.Tensor,
    lora: ModuleLora,
    factor_dtype: torch.dtype,
    block_bytes: int = BLOCK_BYTES,
    buffers: Buffers | None = None,
    rounding: str = "default",
) -> torch.Tensor:
    """The merged weight, in ``weight``'s dtype (in ``buffers`` when given, except DoRA's), rounded as
    ``rounding``'s path rounds (compat/rounding.py)."""
    if lora.magnitude is not None:
        return _dora(weight, delta(lora, factor_dtype), lora, factor_dtype)
    first = facts.rounds_delta_first(installed_peft(), (lora.rounds_like or lora.kind).value, rounding)
    return _plain(weight, lora, factor_dtype, block_bytes, buffers or Buffers(), first)


def _plain(
    weight: torch.Tensor,
    lora: ModuleLora,
    factor_dtype: torch.dtype,
    block_bytes: int,
    buffers: Buffers,
    first: bool,
) -> torch.Tensor:
    """W + get_delta_weight, with the element-wise steps (scale, rounding, add) a block of rows at a time. The
    product itself is one call over the whole weight, as PEFT makes it: the matmul kernel a library picks depends
    on the shapes, and blocks of rows were measured to round a few elements differently (one weight in 154 of a
    TinyLlama)."""
    a, b = factors(lora, factor_dtype)
    product = torch.mm(b, a, out=buffers.take("product", (b.shape[0], a.shape[1]), a.dtype))
    if lora.kind in (LayerKind.LINEAR_FIFO, LayerKind.EMBEDDING):
        product = product.T
    rows = max(1, block_bytes // max(1, weight.shape[1] * product.element_size()))
    merged = buffers.take("merged", tuple(weight.shape), weight.dtype)
    if not first:
        merged.copy_(weight)
    for start in range(0, weight.shape[0], rows):
        stop = min(start + rows, weight.shape[0])
        block = product[start:stop].mul_(lora.scale).to(factor_dtype)  # a widened half delta is rounded back
        if first:
            torch.add(weight[start:stop], block.to(weight.dtype), out=merged[start:stop])
        else:
            merged[start:stop] += block
    return merged


def _dora(weight: torch.Tensor, d: torch.Tensor, lora: ModuleLora, factor_dtype: torch.dtype) -> torch.Tensor:
    """DoRA's merge on a Linear (or Conv1D) weight."""
    fifo = lora.kind is LayerKind.LINEAR_FIFO
    oriented = weight.T if fifo else weight
    combined = oriented + 1 * (d.T if fifo else d)
    norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
    factor = lora.magnitude.to(factor_dtype) / norm
    factor = factor.view(-1, 1)
    if fifo:
        factor = factor.T
    return (factor * (weight + d)).to(weight.dtype)


def merge_bias(
    bias: torch.Tensor, lora: ModuleLora, factor_dtype: torch.dtype, weight_dtype: torch.dtype
) -> torch.Tensor:
    """b + b_B·s, rounded to the weight's dtype (PEFT rounds the new bias to the weight's dtype)."""
    return (bias + lora.bias.to(factor_dtype) * lora.scale).to(weight_dtype)


def merge_stack(weight: torch.Tensor, lora: ModuleLora, factor_dtype: torch.dtype) -> torch.Tensor:
    """A LoRA on an expert stack the checkpoint stores whole ([E, out, in], or [E, in, out]: EXPERTS_T), as
    PEFT's ParamWrapper merges it (0.19 on): the per-expert products by one einsum in the factors' precision,
    scaled, rounded to the stack's dtype and added."""
    a, b = factors(lora, factor_dtype)
    experts = lora.num_experts
    per_a = a.reshape(experts, -1, a.shape[-1])  # experts x rank x in
    per_b = b.reshape(b.shape[0], -1, experts)  # out x rank x experts
    layout = "o r e, e r i -> e i o" if lora.kind is LayerKind.EXPERTS_T else "o r e, e r i -> e o i"
    delta = torch.einsum(layout, per_b, per_a) * lora.scale
    return weight + delta.to(weight.dtype)
