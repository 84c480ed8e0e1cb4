"""Weight-space verification: every parameter of the merged model against what the adapter says it must be.

Touched parameters (merged or replaced) are compared with the float64 expectation within a per-element,
dtype-derived tolerance; every other parameter must equal the base bit for bit (after the cast to the merged
dtype), so a delta landed on the wrong layer, or a head the merge left behind, is named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from safe_merge.merger.delta import dora_factor, low_rank_delta, merged_bias, merged_weight, product_magnitude
from safe_merge.merger.ledger import Ledger
from safe_merge.merger.tolerance import (
    DORA_WEIGHT_ULPS,
    WEIGHT_ULPS,
    eps,
    merge_magnitudes,
    product_error,
    weight_tolerance,
)


@dataclass
class TensorResult:
    name: str
    max_abs: float  # largest |merged − expected|
    max_rel: float  # max_abs relative to the largest |expected − start| (how wrong, measured in deltas)
    ratio: float  # largest residual / tolerance over elements; ≤ 1 passes
    tol: float  # the tolerance at the worst element
    delta: float  # largest |expected − start|: how much this tensor had to move
    resolvable: bool = True  # a merge that left this tensor as it started would fail the check
    problem: str = ""

    @property
    def passed(self) -> bool:
        return not self.problem and self.ratio <= 1.0


@dataclass
class WeightCheck:
    tensors: list[TensorResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    unresolvable: list[str] = field(default_factory=list)  # deltas below the dtype's resolution
    rule: str | None = None  # the tolerance rule, when it is not the float one (quantized bases)

    @property
    def passed(self) -> bool:
        return not self.failures

    def report(self) -> dict:
        worst = max(self.tensors, key=lambda t: t.ratio, default=None)
        return {
            "passed": self.passed,
            "max_abs": max((t.max_abs for t in self.tensors), default=0.0),
            "max_rel": max((t.max_rel for t in self.tensors), default=0.0),
            "tol": worst.tol if worst else 0.0,
            "tol_rule": self.rule
            or f"{WEIGHT_ULPS:g} ulps ({DORA_WEIGHT_ULPS:g} for DoRA) of the stored dtype on the "
            "magnitudes rounded per element, plus r*eps32*|s||B||A|",
            "worst_tensor": worst.name if worst else None,
            "worst_ratio": worst.ratio if worst else 0.0,
            "checked_tensors": len(self.tensors),
            "failures": self.failures,
            "unresolvable": self.unresolvable,
        }


@dataclass
class Expected:
    """A touched parameter: its value before the merge, its exact value after, the size of what was rounded on
    the way (for the tolerance), and the bound on computing the low-rank product."""

    start: torch.Tensor
    value: torch.Tensor
    magnitudes: torch.Tensor
    product_error: torch.Tensor | None = None
    ulps: float = WEIGHT_ULPS


def expected_params(ledger: Ledger, base: Mapping[str, torch.Tensor]) -> dict[str, Expected]:
    """Every parameter the adapter touches, with its exact float64 value after the merge."""
    out: dict[str, Expected] = {
        name: Expected(value, value, merge_magnitudes(value, value)) for name, value in ledger.replacements.items()
    }
    for module, lora in ledger.modules.items():
        wname = f"{module}.weight"
        start = out[wname].value if wname in out else base[wname].to(torch.float64)
        bound = product_error(product_magnitude(lora), lora.rank, lora.compute_dtype)
        value = merged_weight(start, lora)
        if lora.magnitude is None:
            out[wname] = Expected(start, value, merge_magnitudes(start, value), bound)
        else:  # DoRA rescales each output feature: every earlier rounding is scaled with it
            delta = low_rank_delta(lora)
            factor = dora_factor(start, delta, lora.magnitude, lora.kind).expand_as(start)
            magnitudes = merge_magnitudes(start, value, factor=factor, delta=delta)
            out[wname] = Expected(start, value, magnitudes, bound * factor.abs(), DORA_WEIGHT_ULPS)
        if lora.bias is not None:
            bname = f"{module}.bias"
            bstart = out[bname].value if bname in out else base[bname].to(torch.float64)
            bvalue = merged_bias(bstart, lora)
            out[bname] = Expected(bstart, bvalue, merge_magnitudes(bstart, bvalue))
    return out


def check_weights(ledger: Ledger, base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor]) -> WeightCheck:
    """Compare every merged parameter with its expectation; name each tensor that is off."""
    check = WeightCheck()
    touched = expected_params(ledger, base)
    missing = sorted(set(base) - set(merged))
    if missing:
        check.failures.append(f"missing from the merged model: {', '.join(missing[:5])}")
    extra = sorted(set(merged) - set(base))
    if extra:
        check.failures.append(f"not in the base model: {', '.join(extra[:5])}")
    for name in sorted(set(base) & set(merged)):
        got = merged[name]
        if name in touched:
            result = _compare(name, touched[name], got)
            check.tensors.append(result)
            if not result.passed:
                check.failures.append(
                    f"{name}: {result.problem or 'residual off the exact merge'} "
                    f"(max |residual| {result.max_abs:.3g}, {result.ratio:.3g}x tolerance, "
                    f"relative {result.max_rel:.3g})"
                )
            elif result.delta > 0 and not result.resolvable:
                check.unresolvable.append(name)
        elif not torch.equal(base[name].to(got.dtype), got):
            diff = float((base[name].to(torch.float64) - got.to(torch.float64)).abs().max())
            check.failures.append(f"{name}: changed by up to {diff:.3g} although the adapter does not touch it")
    return check


def _compare(name: str, exp: Expected, got: torch.Tensor) -> TensorResult:
    start, expected = exp.start, exp.value
    if tuple(got.shape) != tuple(expected.shape):
        return TensorResult(
            name,
            float("inf"),
            float("inf"),
            float("inf"),
            0.0,
            0.0,
            problem=f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}",
        )
    got64 = got.to(torch.float64)
    residual = (got64 - expected).abs()
    tol = weight_tolerance(exp.magnitudes, got.dtype, exp.product_error, exp.ulps)
    ratio_map = residual / tol
    worst = int(torch.argmax(ratio_map)) if ratio_map.numel() else 0
    max_abs = float(residual.max()) if residual.numel() else 0.0
    delta = float((expected - start).abs().max()) if residual.numel() else 0.0
    size = float(expected.abs().max()) if residual.numel() else 0.0
    problem = "" if bool(torch.isfinite(got64).all()) else "holds NaN or Inf"
    # relative to the delta when the tensor had to move, else (a saved copy) to the tensor itself
    denominator = delta if delta > 0 else size
    return TensorResult(
        name=name,
        max_abs=max_abs,
        max_rel=max_abs / denominator if denominator > 0 else 0.0,
        ratio=float(ratio_map.flatten()[worst]) if ratio_map.numel() else 0.0,
        tol=float(tol.flatten()[worst]) if tol.numel() else eps(got.dtype),
        delta=delta,
        resolvable=bool(((expected - start).abs() > tol).any()),
        problem=problem,
    )
