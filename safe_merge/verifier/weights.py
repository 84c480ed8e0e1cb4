"""Weight-space verification: every parameter of the merged model against what the adapter says it must be.

Each touched parameter (merged or replaced) is first replayed bit for bit by the correct arithmetics the verifier
knows (replay.py: PEFT's default path, its safe_merge path, float64 rounded once): a match is exact, named with
the arithmetic. Any other is compared with the float64 expectation within a per-element, dtype-derived tolerance
("within tolerance, not exact") and its rounding steps are summed for a systematic lean (systematic.py), per
tensor and over all such tensors. Every other parameter must equal the base bit for bit (after the cast to the
merged dtype), so a delta landed on the wrong layer, or a head the merge left behind, is named. A failed tensor
carries its likely cause (diagnosis.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from safe_merge.verifier.bits import finite, same_bits
from safe_merge.verifier.delta import (
    ModuleLora,
    dora_factor,
    low_rank_delta,
    merged_bias,
    merged_weight,
    product_magnitude,
)
from safe_merge.verifier.diagnosis import diagnose
from safe_merge.verifier.ledger import Ledger
from safe_merge.verifier.replay import exact_match
from safe_merge.verifier.systematic import PROBE, Drift, drift
from safe_merge.verifier.tolerance import (
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
    exact: str = ""  # the arithmetic whose bits it matches, when one does
    drift: Drift | None = None  # its rounding steps' lean (tolerance-only tensors)
    cause: str = ""  # the likely cause of a failure

    @property
    def passed(self) -> bool:
        return not self.problem and self.ratio <= 1.0 and not (self.drift is not None and self.drift.systematic)


@dataclass
class WeightCheck:
    tensors: list[TensorResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    unresolvable: list[str] = field(default_factory=list)  # deltas below the dtype's resolution
    rule: str | None = None  # the tolerance rule, when it is not the float one (quantized bases)
    drift: Drift = field(default_factory=Drift)  # the lean of every tolerance-only tensor together

    @property
    def passed(self) -> bool:
        return not self.failures

    def finish(self) -> None:
        """The check over all tolerance-only tensors together, once every tensor is in."""
        if self.drift.systematic and self.drift.tensors > 1:
            together = f"the {self.drift.tensors} tensors not matched exactly, together"
            self.failures.append(f"{together}: {self.drift.describe()}")

    def report(self) -> dict:
        worst = max(self.tensors, key=lambda t: t.ratio, default=None)
        exact = Counter(t.exact for t in self.tensors if t.exact)
        return {
            "exact": dict(exact),
            "tolerance_only": sum(1 for t in self.tensors if not t.exact),
            "systematic": self.drift.report(),
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
    """A touched parameter: its value before the merge (float64) and what it must become: the LoRA merged into it
    (float64), or the value a saved copy or trainable-token rows put there. Its exact value, the size of what was
    rounded on the way (for the tolerance) and the bound on computing the low-rank product are computed only
    when the exact tier did not match."""

    start: torch.Tensor
    lora: ModuleLora | None = None
    leaf: str = "weight"
    copy: torch.Tensor | None = None
    stored_dtype: torch.dtype | None = None  # the base tensor's dtype as stored

    @functools.cached_property
    def value(self) -> torch.Tensor:
        if self.lora is None:
            return self.start if self.copy is None else self.copy
        if self.leaf == "bias":
            return merged_bias(self.start, self.lora)
        return merged_weight(self.start, self.lora)

    @property
    def dora(self) -> bool:
        return self.lora is not None and self.leaf == "weight" and self.lora.magnitude is not None

    @functools.cached_property
    def magnitudes(self) -> torch.Tensor:
        if not self.dora:
            return merge_magnitudes(self.start, self.value)
        # DoRA rescales each output feature: every earlier rounding is scaled with it
        delta = low_rank_delta(self.lora)
        factor = dora_factor(self.start, delta, self.lora.magnitude, self.lora.kind).expand_as(self.start)
        return merge_magnitudes(self.start, self.value, factor=factor, delta=delta)

    @property
    def product_error(self) -> torch.Tensor | None:
        if self.lora is None or self.leaf != "weight":
            return None
        bound = product_error(product_magnitude(self.lora), self.lora.rank, self.lora.compute_dtype)
        if not self.dora:
            return bound
        delta = low_rank_delta(self.lora)
        return bound * dora_factor(self.start, delta, self.lora.magnitude, self.lora.kind).expand_as(self.start).abs()

    def changes(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The exact change from the start in ``dtype`` (where every merge starts), and how much further a scale
        PROBE larger moves it where that is not PROBE times the change (DoRA, whose normalisation also depends
        on the start; None for a plain LoRA, whose change does not)."""
        if not self.dora:
            return self.value - self.start, None
        start = self.start.to(dtype).to(torch.float64)
        value = merged_weight(start, self.lora)
        larger = dataclasses.replace(self.lora, scale=self.lora.scale * (1 + PROBE))
        return value - start, merged_weight(start, larger) - value

    @property
    def ulps(self) -> float:
        return DORA_WEIGHT_ULPS if self.dora else WEIGHT_ULPS


def touched_params(ledger: Ledger) -> set[str]:
    """Every parameter the adapter touches: saved copies, merged weights, merged biases."""
    out = set(ledger.replacements) | set(ledger.token_rows)
    for module, lora in ledger.modules.items():
        out.add(lora.target)
        if lora.bias is not None:
            out.add(f"{module}.bias")
    return out


def expected_param(name: str, ledger: Ledger, base: Mapping[str, torch.Tensor]) -> Expected:
    """One touched parameter: where it starts and what the adapter puts there."""
    saved = ledger.replacements.get(name)
    source = saved if saved is not None else base[name]
    start = source.to(torch.float64)
    stored = source.dtype
    rows = ledger.token_rows.get(name)
    if rows is not None:
        value = start.index_copy(0, rows.indices, rows.values.to(torch.float64))
        return Expected(start, copy=value, stored_dtype=stored)
    module, _, leaf = name.rpartition(".")
    lora = ledger.modules.get(name) or ledger.modules.get(module)  # a LoRA on a parameter is keyed by its name
    merges_here = lora is not None and (name == lora.target or (leaf == "bias" and lora.bias is not None))
    if not merges_here:
        return Expected(start, copy=start, stored_dtype=stored)  # a saved copy
    return Expected(start, lora.widened(), "bias" if leaf == "bias" else "weight", stored_dtype=stored)


def expected_params(ledger: Ledger, base: Mapping[str, torch.Tensor]) -> dict[str, Expected]:
    """Every parameter the adapter touches, with its exact float64 value after the merge."""
    return {name: expected_param(name, ledger, base) for name in sorted(touched_params(ledger))}


def untouched_failure(name: str, base: torch.Tensor, got: torch.Tensor) -> str | None:
    """A parameter the adapter does not touch must equal the base bit for bit (after the cast to the merged dtype)."""
    if torch.equal(base.to(got.dtype), got):
        return None
    diff = float((base.to(torch.float64) - got.to(torch.float64)).abs().max())
    return f"{name}: changed by up to {diff:.3g} although the adapter does not touch it"


def add_result(check: WeightCheck, result: TensorResult) -> None:
    check.tensors.append(result)
    if result.drift is not None and not result.exact and not result.problem and result.ratio <= 1.0:
        check.drift.add(result.drift)  # the lean hidden inside every element's tolerance, summed
    if not result.passed:
        leaning = result.drift is not None and result.drift.systematic and not result.problem and result.ratio <= 1
        what = result.problem or (result.drift.describe() if leaning else "residual off the exact merge")
        cause = f"; likely cause: {result.cause}" if result.cause else ""
        check.failures.append(
            f"{result.name}: {what}{cause} "
            f"(max |residual| {result.max_abs:.3g}, {result.ratio:.3g}x tolerance, relative {result.max_rel:.3g})"
        )
    elif result.delta > 0 and not result.resolvable:
        check.unresolvable.append(result.name)


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
            add_result(check, compare(name, touched[name], got))
        else:
            failure = untouched_failure(name, base[name], got)
            if failure:
                check.failures.append(failure)
    check.finish()
    return check


@dataclass
class Stats:
    """A comparison's figures over some of a tensor's elements; blocks of one tensor combine. ``ratio`` is the
    largest residual / tolerance, ``tol`` the tolerance there; ``delta`` and ``size`` the largest |expected −
    start| and |expected|; ``resolvable`` whether some element moves by more than its tolerance."""

    max_abs: float = 0.0
    ratio: float = 0.0
    tol: float = 0.0  # at the worst element
    delta: float = 0.0
    size: float = 0.0
    resolvable: bool = False
    finite: bool = True
    drift: Drift | None = None

    def add(self, other: Stats) -> None:
        if other.drift is not None:
            if self.drift is None:
                self.drift = Drift()
            self.drift.add(other.drift)
        if other.ratio > self.ratio or not self.tol:
            self.ratio, self.tol = other.ratio, other.tol
        self.max_abs = max(self.max_abs, other.max_abs)
        self.delta = max(self.delta, other.delta)
        self.size = max(self.size, other.size)
        self.resolvable = self.resolvable or other.resolvable
        self.finite = self.finite and other.finite


def stats(exp: Expected, got: torch.Tensor) -> Stats:
    if not got.numel():
        return Stats(tol=eps(got.dtype))
    expected = exp.value
    leaning = None
    if exp.lora is not None:
        leaning = drift(got, exp.start.to(got.dtype), *exp.changes(got.dtype))
    residual = got.to(expected.dtype).sub_(expected).abs_()
    moved = (expected - exp.start).abs_()
    tol = weight_tolerance(exp.magnitudes, got.dtype, exp.product_error, exp.ulps)
    ratio = (residual / tol).flatten()
    worst = int(torch.argmax(ratio))  # NaN counts as the largest, so a NaN element is the one reported
    max_abs = float(residual.max())  # NaN or Inf in the merged tensor make this NaN or Inf
    return Stats(
        max_abs=max_abs,
        ratio=float(ratio[worst]),
        tol=float(tol.flatten()[worst]),
        delta=float(moved.max()),
        size=float(expected.abs().max()),
        resolvable=bool((moved > tol).any()),
        finite=math.isfinite(max_abs),
        drift=leaning,
    )


def compare(name: str, exp: Expected, got: torch.Tensor) -> TensorResult:
    """A merged parameter against its expectation: exact when a known arithmetic's bits match, else element by
    element within the tolerance, with its lean and, when it fails, its likely cause."""
    if tuple(got.shape) != tuple(exp.start.shape):
        return mismatched(name, tuple(got.shape), tuple(exp.start.shape))
    start = exp.start.to(got.dtype)
    stored = exp.start.to(exp.stored_dtype) if exp.stored_dtype not in (None, got.dtype) else None
    label = exact_match(got, start, exp.lora, exp.leaf, exp.copy, stored)
    if label:
        return exact_result(name, label, got, start, lambda: exp.value - exp.start)
    checked = result(name, stats(exp, got))
    if not checked.passed and not checked.problem and exp.lora is not None:
        checked.cause = diagnose(got, exp.start, exp.lora if exp.leaf == "weight" else None, exp.value)
    return checked


def exact_result(name: str, label: str, got: torch.Tensor, start: torch.Tensor, exact_change) -> TensorResult:
    """A tensor whose bits a known arithmetic writes: nothing off. Only when it did not move at all is the exact
    change computed (``exact_change()``), to tell an adapter that asked for no change from one whose change is
    below the dtype's resolution; ``delta`` is then its size (left 0 for a tensor that moved: not measured)."""
    if not finite(got):  # equal bits to a merge that overflowed are still no usable weight
        inf = float("inf")
        return TensorResult(name, inf, inf, inf, 0.0, 0.0, problem="holds NaN or Inf")
    if not got.numel() or not same_bits(got, start):
        return TensorResult(name, 0.0, 0.0, 0.0, 0.0, 0.0, exact=label)
    delta = float(exact_change().abs().max())
    return TensorResult(name, 0.0, 0.0, 0.0, 0.0, delta, resolvable=delta == 0, exact=label)


def compare_blocks(name: str, blocks: Iterable[Stats]) -> TensorResult:
    """As ``compare``, over a tensor compared a block of elements at a time (each block's figures)."""
    total = Stats()
    for block in blocks:
        total.add(block)
    return result(name, total)


def mismatched(name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> TensorResult:
    inf = float("inf")
    return TensorResult(name, inf, inf, inf, 0.0, 0.0, problem=f"shape {got}, expected {expected}")


def result(name: str, s: Stats) -> TensorResult:
    # relative to the delta when the tensor had to move, else (a saved copy) to the tensor itself
    denominator = s.delta if s.delta > 0 else s.size
    return TensorResult(
        name=name,
        max_abs=s.max_abs,
        max_rel=s.max_abs / denominator if denominator > 0 else 0.0,
        ratio=s.ratio,
        tol=s.tol,
        delta=s.delta,
        resolvable=s.resolvable,
        problem="" if s.finite else "holds NaN or Inf",
        drift=s.drift,
    )
