"""Tolerances derived from the stored dtype, never one loose constant.

Weights: a merge rounds a handful of times (the delta cast to the weight's dtype, the sum, and for DoRA the norm,
the ratio and the product), each within half a unit in the last place. WEIGHT_ULPS = 4 units of the stored dtype,
taken on the magnitudes involved (|W| + |W'| + |ΔW|), covers the worst of these with a factor of two to spare.
Computing B·A itself (r products summed, in the adapter's precision, float32 or wider) errs by at most
r·eps·(|s|·|B|·|A|), the classic bound for an r-term dot product; that term is added as it is. A change of the
delta by a few percent of itself (a wrong scale, a missing transpose, a doubled delta) is far outside the sum
whenever the delta is resolvable in that dtype.

Outputs: the merged and unmerged models round differently in every layer, so their difference grows with depth
and with the size of activations. OUTPUT_ULPS units of the dtype, relative to the largest reference output,
bounds it; the factor was measured (see the closing note of the foundation issue) with margin.
"""

from __future__ import annotations

import torch

WEIGHT_ULPS = 4.0
OUTPUT_ULPS = {torch.float32: 64.0, torch.float64: 64.0, torch.bfloat16: 8.0, torch.float16: 16.0}


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def smallest_step(dtype: torch.dtype) -> float:
    """Spacing of the dtype's subnormals: the absolute floor of any rounding error."""
    info = torch.finfo(dtype)
    return float(info.tiny) * float(info.eps)


def weight_tolerance(
    start: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, product_error: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-element tolerance for a merged weight stored in ``dtype`` (float64 inputs).

    ``product_error`` is the bound on computing the low-rank product, already in absolute units.
    """
    scale = start.abs() + expected.abs() + (expected - start).abs()
    tol = WEIGHT_ULPS * (eps(dtype) * scale + smallest_step(dtype))
    return tol if product_error is None else tol + product_error


def product_error(magnitude: torch.Tensor, rank: int, compute_dtype: torch.dtype) -> torch.Tensor:
    """Bound on the rounding error of an r-term product computed in ``compute_dtype``."""
    return rank * eps(compute_dtype) * magnitude


def output_tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """Absolute tolerance on outputs of a model computed in ``dtype``."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return OUTPUT_ULPS.get(dtype, 64.0) * eps(dtype) * max(scale, 1.0)
