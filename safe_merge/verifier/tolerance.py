"""Tolerances derived from the stored dtype, never one loose constant.

Weights: a plain merge rounds at most three times (the base cast to the merged dtype, the delta cast, the sum),
each within half a unit in the last place (ulp): at most 1.5 ulps. WEIGHT_ULPS = 4 units of the stored dtype,
taken on the magnitudes involved (|W| + |W'| + |ΔW|), leaves a factor of 2.5 to spare. DoRA rounds about twice
as often (W + ΔW, its norm, the magnitude, the ratio, the product, the cast): DORA_WEIGHT_ULPS = 8, on
magnitudes that carry its factor m/‖W + ΔW‖ (which multiplies every earlier rounding; see merge_magnitudes).
Computing B·A itself (r products summed, in the adapter's precision, float32 or wider) errs by at most
r·eps·(|s|·|B|·|A|), the classic bound for an r-term dot product; that term is added as it is. A change of the
delta by a few percent of itself (a wrong scale, a missing transpose, a doubled delta) is far outside the sum
whenever the delta is resolvable in that dtype.

Outputs: the merged and unmerged models round differently in every layer. How much depends on the model: where
a matmul's terms cancel, its rounding error is large next to its result, so no fixed number of ulps of the output
fits every model. Two measures, the larger wins:
- the models' own rounding noise: the unmerged reference and the merged model are each run once more in float64,
  and they may differ by NOISE_FACTOR = 3 times the sum of their distances from those runs (each model's rounding,
  plus the rounding of the merged weights themselves, which neither run can see). Over 6,000 merges drawn with
  random seeds (thorough profile) the worst ratio of difference to summed noise was 1.89 (bfloat16), 1.63
  (float16), 1.88 (float32), and the worst difference 0.63x the tolerance.
  Both terms are needed: with DoRA at large scales the merged model's noise was 8x the reference's, and a
  tolerance built on the reference alone failed correct merges (found by the thorough profile).
- a floor of OUTPUT_ULPS = 4 ulps x sqrt(depth) of the largest reference output.
The floor is all that is used when a float64 copy does not fit in memory. The report says whether a merge that did
nothing would have failed the check; the weight check, not this one, is the exact one.
"""

from __future__ import annotations

import math

import torch

WEIGHT_ULPS = 4.0
DORA_WEIGHT_ULPS = 8.0
OUTPUT_ULPS = 4.0
NOISE_FACTOR = 3.0


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


def merge_magnitudes(
    start: torch.Tensor,
    expected: torch.Tensor,
    factor: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """|W| + |ΔW| + |W'| for a plain merge. DoRA's W' = f·(W + ΔW) carries every rounding of W and ΔW
    multiplied by f, so there (given ``factor`` and ``delta``) it is |f|·(|W| + |ΔW| + |W + ΔW|) + |W'|."""
    if factor is None or delta is None:
        return start.abs() + expected.abs() + (expected - start).abs()
    return factor.abs() * (start.abs() + delta.abs() + (start + delta).abs()) + expected.abs()


def product_error(magnitude: torch.Tensor, rank: int, compute_dtype: torch.dtype) -> torch.Tensor:
    """Bound on the rounding error of an r-term product computed in ``compute_dtype``; factors held in a 16-bit
    dtype were also rounded once each on the way in."""
    stored = 2 if compute_dtype in (torch.bfloat16, torch.float16) else 0
    return (rank + stored) * eps(compute_dtype) * magnitude


def output_tolerance(reference: torch.Tensor, dtype: torch.dtype, depth: int = 1, noise: float | None = None) -> float:
    """Absolute tolerance on the outputs of a ``depth``-layer model computed in ``dtype``; ``noise`` is the
    reference's measured distance from its float64 twin, when it was measured."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    floor = OUTPUT_ULPS * math.sqrt(max(depth, 1)) * eps(dtype) * max(scale, 1.0)
    return floor if noise is None else max(floor, NOISE_FACTOR * noise)
