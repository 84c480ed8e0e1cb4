"""Tolerances derived from the stored dtype, never one loose constant.

Weights: a plain merge rounds at most three times (the base cast to the merged dtype, the delta cast, the sum),
each within half a unit in the last place (ulp): at most 1.5 ulps. WEIGHT_ULPS = 4 units of the stored dtype,
taken on the magnitudes involved (|W| + |W'| + |ΔW|), leaves a factor of 2.5 to spare. DoRA rounds about twice
as often (W + ΔW, its norm, the magnitude, the ratio, the product, the cast): DORA_WEIGHT_ULPS = 8.
Computing B·A itself (r products summed, in the adapter's precision, float32 or wider) errs by at most
r·eps·(|s|·|B|·|A|), the classic bound for an r-term dot product; that term is added as it is. A change of the
delta by a few percent of itself (a wrong scale, a missing transpose, a doubled delta) is far outside the sum
whenever the delta is resolvable in that dtype.

Outputs: the merged and unmerged models round differently in every layer, so their difference grows with the
size of activations and, like a random walk, with the square root of depth. On the property tests' tiny models
the worst difference measured was 2.2 ulps of the largest reference output in float32 and 1 ulp in bfloat16 and
float16; OUTPUT_ULPS = 4 per sqrt(layer) keeps a margin of two over the worst and still fails a merge that did
nothing whenever the adapter moves the outputs by more than a few ulps (the check reports whether it could).
"""

from __future__ import annotations

import math

import torch

WEIGHT_ULPS = 4.0
DORA_WEIGHT_ULPS = 8.0
OUTPUT_ULPS = 4.0


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def smallest_step(dtype: torch.dtype) -> float:
    """Spacing of the dtype's subnormals: the absolute floor of any rounding error."""
    info = torch.finfo(dtype)
    return float(info.tiny) * float(info.eps)


def weight_tolerance(
    magnitudes: torch.Tensor,
    dtype: torch.dtype,
    product_error: torch.Tensor | None = None,
    ulps: float = WEIGHT_ULPS,
) -> torch.Tensor:
    """Per-element tolerance for a merged weight stored in ``dtype``.

    ``magnitudes`` is the size of everything that was rounded on the way to each element (see
    ``merge_magnitudes``); ``product_error`` bounds computing the low-rank product, in absolute units.
    """
    tol = ulps * (eps(dtype) * magnitudes + smallest_step(dtype))
    return tol if product_error is None else tol + product_error


def merge_magnitudes(start: torch.Tensor, expected: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
    """|W| + |ΔW| + |W'| for a plain merge. DoRA's W' = f·(W + ΔW) carries every rounding of W and ΔW
    multiplied by f, so there it is |f|·(|W| + |ΔW| + |W + ΔW|) + |W'|."""
    if factor is None:
        return start.abs() + expected.abs() + (expected - start).abs()
    pre = expected / factor
    return factor.abs() * (start.abs() + (pre - start).abs() + pre.abs()) + expected.abs()


def product_error(magnitude: torch.Tensor, rank: int, compute_dtype: torch.dtype) -> torch.Tensor:
    """Bound on the rounding error of an r-term product computed in ``compute_dtype``."""
    return rank * eps(compute_dtype) * magnitude


def output_tolerance(reference: torch.Tensor, dtype: torch.dtype, depth: int = 1) -> float:
    """Absolute tolerance on the outputs of a ``depth``-layer model computed in ``dtype``."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return OUTPUT_ULPS * math.sqrt(max(depth, 1)) * eps(dtype) * max(scale, 1.0)
