"""Systematic-error statistics: a deviation every element's own tolerance hides, seen in the sum over elements.

A merge at 1.001× the adapter's strength, or with a block of the delta shifted or sign-flipped, may keep every
element within a few ulps of the exact merge when the adapter's updates are small next to the weights. Each such
element is then one rounding step off the once-rounded exact merge, and the steps all lean the same way: along
the direction the adapter moves that element (a scale above 1), or against it (below 1, a flipped sign). A correct
merge by an arithmetic the exact tier does not know also lands a step off here and there, but its steps are
rounding noise: they lean neither way.

For each tensor: u_i = (merged_i − R_i) / ulp_i, where R is the exact merge from the start in the merged dtype,
rounded once (from the start as every merge casts it, so that casting noise is not counted), ulp_i the spacing
(taken as eps·|x|, within a factor of 2 of it) at the larger of |R_i| and the start's, and s_i the sign of the
way a larger scale moves the element (the exact change's, for plain LoRA; DoRA's normalisation turns it).
``along`` = Σ s_i·u_i, ``spread`` = Σ u_i²; z = along / √spread is about normal for noise.
``reach`` is how many steps a scale error ε adds per unit of ε, measured by rounding the exact merge at
1 + PROBE instead of 1. The estimate of the scale error is along / reach.

A tensor, or all of an adapter's tensors summed, fails when |z| > Z_LIMIT and the estimated scale error exceeds
SMALLEST_SCALE_ERROR; the report states the smallest scale error that would have been seen,
(Z² + Z·√(Z² + 4·spread)) / (2·reach): the error whose steps, εR, clear Z standard deviations of the noise plus
themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Z_LIMIT = 6.0  # standard deviations: a false alarm about once in 10^9 tensors
SMALLEST_SCALE_ERROR = 2.0**-12  # 0.024 %: below this a lean is not called an error, whatever its significance
PROBE = 2.0**-10  # the scale error whose added steps measure reach


@dataclass
class Drift:
    along: float = 0.0
    spread: float = 0.0
    reach: float = 0.0
    tensors: int = 0

    def add(self, other: Drift) -> None:
        self.along += other.along
        self.spread += other.spread
        self.reach += other.reach
        self.tensors += other.tensors

    @property
    def z(self) -> float:
        return self.along / math.sqrt(self.spread) if self.spread else 0.0

    @property
    def scale_error(self) -> float:
        """The estimated relative scale error of the change (0: none seen)."""
        return self.along / self.reach if self.reach else 0.0

    @property
    def systematic(self) -> bool:
        return abs(self.z) > Z_LIMIT and abs(self.scale_error) > SMALLEST_SCALE_ERROR

    @property
    def detectable(self) -> float:
        """The smallest scale error these tensors would have shown (inf when nothing moves)."""
        if not self.reach:
            return math.inf
        z = Z_LIMIT
        return max((z * z + z * math.sqrt(z * z + 4 * self.spread)) / (2 * self.reach), SMALLEST_SCALE_ERROR)

    def describe(self) -> str:
        lean = "along" if self.along > 0 else "against"
        return (
            f"its rounding steps lean {lean} the adapter's change (z = {self.z:.1f} over {self.spread:.0f} steps): "
            f"a scale error of about {self.scale_error:+.2%}"
        )

    def report(self) -> dict:
        return {
            "tensors": self.tensors,
            "z": round(self.z, 2),
            "scale_error": self.scale_error,
            "steps_off": self.spread,
            "smallest_scale_error_seen": self.detectable,
        }


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` near each of ``values`` (non-negative, float32 or float64), as eps·|x|: within a
    factor of 2 of the exact spacing, and the same weight in every sum below, so the statistic is unchanged in
    kind and costs one pass (subnormals floored at their own spacing)."""
    info = torch.finfo(dtype)
    return (values * info.eps).clamp_(min=info.tiny * info.eps)


def drift(
    got: torch.Tensor, start: torch.Tensor, change: torch.Tensor, probe_change: torch.Tensor | None = None
) -> Drift:
    """The statistics of one tensor (or a block of it): ``start`` is its value before the merge in ``got``'s dtype,
    ``change`` the exact change (float32 or float64, like the weight), ``probe_change`` how much further the
    exact value moves when the adapter's scale grows by PROBE (default: PROBE·change, a plain LoRA's; DoRA's
    normalisation makes it another direction)."""
    precision = change.dtype
    if probe_change is None:
        probe_change = change * PROBE
    base = start.to(precision)
    exact = base + change
    rounded = exact.to(got.dtype).to(precision)
    # the spacing where the sum was rounded: at the larger of the result and the start (a result that cancels
    # to near zero has a fine spacing no arithmetic rounds at)
    spacing = ulp(torch.maximum(rounded.abs(), base.abs_()), got.dtype)
    steps = got.to(precision).sub_(rounded).div_(spacing)
    probe = exact.add_(probe_change).to(got.dtype).to(precision).sub_(rounded).div_(spacing)
    finite = torch.isfinite(steps)
    if not bool(finite.all()):
        steps = torch.where(finite, steps, torch.zeros_like(steps))  # NaN and Inf are failed elsewhere, by name
    sign = torch.sign(probe_change).flatten()
    return Drift(
        along=float(torch.dot(sign, steps.flatten())),
        spread=float(torch.dot(steps.flatten(), steps.flatten())),
        reach=float(torch.dot(sign, probe.flatten())) / PROBE,
        tensors=1,
    )
