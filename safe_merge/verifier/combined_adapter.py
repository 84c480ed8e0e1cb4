"""Check a combined adapter against its sources, computed from each source's own tensors and config.

Together with the ordinary verification of the merged model against the combined adapter (weights and outputs),
this ties the merged model to what the combination means, not to PEFT's implementation of it.

- Deterministic types: the combined adapter's delta, module by module, against combine.combined_delta, within
  a bound on PEFT's float32 arithmetic (for the *svd types, widened by how sharply the SVD cut is determined:
  when the singular values at the cut nearly tie, the best low-rank approximation is not unique, and that is a
  gap, not a pass).
- DARE (random masks): each combined factor entry must be one of the values some mask could produce: the
  weighted, rescaled sum (dare_linear) or mean (dare_ties) of any subset of the sources' entries; and the share
  of each source's entries kept must fit the density.
- Every source tensor is accounted for (a ledger per source), and the combined adapter's own scaling must be 1,
  since its factors already carry every weight and scale.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.verifier.combination_math import (
    RANDOM,
    TASK_THEN_SVD,
    best_rank,
    combined_delta,
    factor_weights,
    task_delta,
)
from safe_merge.verifier.combination_types import Combination, svd_rank
from safe_merge.verifier.delta import LayerKind, ModuleLora, low_rank_delta, product_magnitude
from safe_merge.verifier.ledger import Ledger, Status, build_ledger
from safe_merge.verifier.tolerance import eps

ARITHMETIC_ULPS = 4.0  # per source term: weight rounding, the products, the sum
SVD_BACKWARD = 8.0  # LAPACK's SVD is backward stable: error within a few eps·sqrt(n)·sigma_1
UNDETERMINED = 0.5  # a cut whose uncertainty reaches half the delta cannot tell right from wrong
DENSITY_SIGMAS = 6.0


@dataclass
class ModuleResult:
    module: str
    max_abs: float
    tol: float
    ratio: float
    delta: float  # largest |reference delta|


@dataclass
class _Tally:
    """DARE: what the masks kept, per source and per position, against what the density predicts."""

    kept: list[int]  # entries of each source that the combination kept
    seen: list[int]  # nonzero entries of each source
    positions: int = 0  # factor entries where some source is nonzero
    filled: int = 0  # of those, entries the combination kept something at
    expected: float = 0.0  # sum over positions of P(some entry survives its mask) = 1 - (1 - d)^k
    variance: float = 0.0


@dataclass
class CombinationCheck:
    combination: Combination
    source_files: list[AdapterFiles]
    sources: list[Ledger]
    combined: Ledger
    modules: list[ModuleResult] = field(default_factory=list)
    kept: dict[int, float] = field(default_factory=dict)  # DARE: share of each source's entries kept
    failures: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def report(self) -> dict:
        worst = max(self.modules, key=lambda m: m.ratio, default=None)
        out = {
            **self.combination.report(),
            "passed": self.passed,
            "modules_checked": len(self.modules),
            "worst_module": worst.module if worst else None,
            "worst_ratio": worst.ratio if worst else 0.0,
            "max_abs": max((m.max_abs for m in self.modules), default=0.0),
            "failures": self.failures,
            "gaps": self.gaps,
        }
        if self.kept:
            out["kept_share"] = {str(i): round(v, 4) for i, v in self.kept.items()}
        return out


def check_combination(
    sources: Sequence[AdapterFiles],
    combined: AdapterFiles,
    combination: Combination,
    base_params: Mapping[str, torch.Tensor],
    kinds: Mapping[str, LayerKind],
    release: str | None = None,
) -> CombinationCheck:
    """The combined adapter against what ``combination`` of ``sources`` means in ``release`` (None: current PEFT)."""
    ledgers = [build_ledger(s, base_params, kinds) for s in sources]
    check = CombinationCheck(combination, list(sources), ledgers, build_ledger(combined, base_params, kinds))
    for i, ledger in enumerate(ledgers):
        for entry in ledger.entries:
            if entry.status is Status.MERGED or _base_copy(entry, ledger, base_params):
                continue
            check.failures.append(f"adapter {i} ({sources[i].path.name}): {entry.key} {entry.status.value}")
    kind = combination.effective_type(len(sources))
    tally = _Tally([0] * len(sources), [0] * len(sources))
    modules = sorted({m for ledger in ledgers for m in ledger.modules})
    for module in modules:
        present = [(i, ledger.modules[module]) for i, ledger in enumerate(ledgers) if module in ledger.modules]
        got = check.combined.modules.get(module)
        if got is None:
            which = ", ".join(str(i) for i, _ in present)
            check.failures.append(f"{module}: adapter(s) {which} change it, the combined adapter does not")
            continue
        loras = [lora for _, lora in present]
        weights = [combination.weights[i] for i, _ in present]
        if kind in RANDOM:
            _check_random(check, module, kind, present, weights, got, tally)
        else:
            _check_delta(check, module, kind, loras, weights, got, release)
    for module, lora in check.combined.modules.items():
        if module not in modules and float(lora.b.abs().max()) * float(lora.a.abs().max()) != 0:
            check.failures.append(f"{module}: the combined adapter changes it, no source adapter does")
    if kind in RANDOM:
        _check_density(check, kind, tally)
    return check


def _base_copy(entry, ledger: Ledger, base_params: Mapping[str, torch.Tensor]) -> bool:
    """A saved copy identical to the base parameter (PEFT saves embedding weights beside embedding LoRAs) or
    PEFT's spare original: neither changes the merge."""
    if entry.status is Status.SKIPPED:
        return True
    if entry.status is not Status.REPLACED or entry.param not in base_params:
        return False
    return torch.equal(ledger.replacements[entry.param], base_params[entry.param].to(torch.float64))


def _check_delta(check, module, kind, loras, weights, got: ModuleLora, release: str | None) -> None:
    c = check.combination
    rank = svd_rank(c, [s.config for s in check.source_files])
    sigma = None
    if kind in TASK_THEN_SVD:
        reference, sigma = best_rank(task_delta(loras, weights, kind, c.density, c.majority_sign), rank)
    else:
        reference = combined_delta(loras, weights, kind, density=c.density, majority=c.majority_sign, release=release)
    if got.a.shape[0] != got.b.shape[1]:
        check.failures.append(
            f"{module}: combined factors do not fit together (A {tuple(got.a.shape)}, B {tuple(got.b.shape)})"
        )
        return
    delta = low_rank_delta(got)
    if tuple(delta.shape) != tuple(reference.shape):
        check.failures.append(
            f"{module}: combined delta has shape {tuple(delta.shape)}, expected {tuple(reference.shape)}"
        )
        return
    unit = max(eps(got.compute_dtype), *(eps(lora.compute_dtype) for lora in loras))
    n = len(loras)
    # the sources' weighted products, as PEFT forms them in float32
    terms = sum(abs(w) * product_magnitude(lora) for lora, w in zip(loras, weights, strict=True))
    if sigma is not None:
        tol = _svd_tolerance(check, module, reference, sigma, terms, unit, rank)
        if tol is None:
            return
    elif kind == "cat":
        tol = ARITHMETIC_ULPS * unit * terms
    else:  # entrywise on factors: each combined factor is off by (n+3) roundings of its summed magnitude
        wa, wb = factor_weights(loras, weights, release)
        a_mag = sum(abs(x) * lora.a.abs() for x, lora in zip(wa, loras, strict=True))
        b_mag = sum(abs(x) * lora.b.abs() for x, lora in zip(wb, loras, strict=True))
        bound = product_magnitude(ModuleLora(module, got.kind, a_mag, b_mag, 1.0))
        tol = 2 * (n + 3) * unit * bound
    residual = (delta - reference).abs()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(residual).clamp(min=torch.finfo(torch.float64).tiny)
    ratio_map = residual / tol
    worst = int(torch.argmax(ratio_map))
    result = ModuleResult(
        module,
        float(residual.max()),
        float(tol.flatten()[worst]),
        float(ratio_map.flatten()[worst]),
        float(reference.abs().max()),
    )
    check.modules.append(result)
    if result.ratio > 1:
        check.failures.append(
            f"{module}: combined delta off what {c.type} of the adapters means (max |diff| {result.max_abs:.3g}, "
            f"{result.ratio:.3g}x tolerance, the delta itself is up to {result.delta:.3g})"
        )


def _svd_tolerance(check, module, reference, sigma, terms, unit, rank) -> float | None:
    """A bound on |PEFT's cut − ours|: float32 error in what is cut (inputs and the SVD itself), amplified by
    1 + 2·sigma_1/gap at the cut (Wedin), or, whatever the gap, twice the error plus the cut-off part."""
    s1 = float(sigma[0]) if sigma.numel() else 0.0
    s_k = float(sigma[rank - 1]) if rank <= sigma.numel() else 0.0
    s_next = float(sigma[rank]) if rank < sigma.numel() else 0.0
    shape = (reference.shape[0], reference[0].numel())
    error = (
        float(torch.linalg.matrix_norm(ARITHMETIC_ULPS * unit * terms.reshape(shape)))
        + SVD_BACKWARD * unit * math.sqrt(max(shape)) * s1
        + 2 * unit * rank * s1  # storing U·S and V
    )
    gap = s_k - s_next
    tol = 2 * (error + s_next)
    if gap > 0:
        tol = min(tol, error * (2 + 2 * s1 / gap))
    size = float(reference.abs().max())
    if size > 0 and tol >= UNDETERMINED * size:
        check.gaps.append(
            f"{module}: the rank-{rank} cut falls between singular values {s_k:.4g} and {s_next:.4g}; the "
            "best low-rank approximation is not determined well enough to check"
        )
        return None
    return tol


def _check_random(check, module, kind, present, weights, got: ModuleLora, tally: _Tally) -> None:
    """Every combined factor entry must be a value some mask could give; count what the masks kept."""
    c = check.combination
    loras = [lora for _, lora in present]
    if abs(got.scale - 1.0) > 1e-12:
        check.failures.append(
            f"{module}: the combined adapter scales its delta by {got.scale:.6g}; its factors already carry "
            "every weight and scale, so it must be 1"
        )
    wa, wb = factor_weights(loras, weights)
    unit = max(eps(got.compute_dtype), *(eps(lora.compute_dtype) for lora in loras))
    worst = ModuleResult(module, 0.0, 0.0, 0.0, 0.0)
    for side, factor_w, theirs in (("A", wa, got.a), ("B", wb, got.b)):
        mine = [lora.a if side == "A" else lora.b for lora in loras]
        if any(tuple(m.shape) != tuple(theirs.shape) for m in mine):
            check.failures.append(
                f"{module}: combined lora_{side} shape {tuple(theirs.shape)} differs from the sources"
            )
            continue
        terms = torch.stack([w * m / c.density for w, m in zip(factor_w, mine, strict=True)])
        best_diff, best_subset = _nearest_subset(terms, theirs, mean=kind == "dare_ties")
        tol = ((len(mine) + 4) * unit * terms.abs().sum(0)).clamp(min=torch.finfo(torch.float64).tiny)
        ratio = best_diff / tol
        if float(ratio.max()) > worst.ratio:
            at = int(torch.argmax(ratio))
            worst = ModuleResult(
                module, float(best_diff.max()), float(tol.flatten()[at]), float(ratio.max()), float(theirs.abs().max())
            )
        off = ratio > 1
        if bool(off.any()):
            check.failures.append(
                f"{module}: {int(off.sum())} of {off.numel()} lora_{side} entries are no masked combination of the "
                f"sources (max |diff| {float(best_diff.max()):.3g})"
            )
        nonzero = terms != 0
        for j, (i, _) in enumerate(present):
            tally.kept[i] += int(((best_subset >> j) & 1).bool()[nonzero[j]].sum())
            tally.seen[i] += int(nonzero[j].sum())
        sources_here = nonzero.sum(0)
        survive = 1 - (1 - c.density) ** sources_here[sources_here > 0].to(torch.float64)
        tally.positions += int((sources_here > 0).sum())
        tally.filled += int(((best_subset != 0) & (sources_here > 0)).sum())
        tally.expected += float(survive.sum())
        tally.variance += float((survive * (1 - survive)).sum())
    check.modules.append(worst)


def _nearest_subset(terms: torch.Tensor, got: torch.Tensor, *, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For each entry, the distance to the nearest subset sum (or mean) of ``terms`` and that subset's bitmask."""
    n = terms.shape[0]
    best = got.abs()  # the empty subset: 0
    which = torch.zeros(got.shape, dtype=torch.int64)
    for size in range(1, n + 1):
        for subset in itertools.combinations(range(n), size):
            value = terms[list(subset)].sum(0)
            if mean:
                value = value / size
            diff = (got - value).abs()
            closer = diff < best
            best = torch.where(closer, diff, best)
            which = torch.where(closer, torch.tensor(sum(1 << j for j in subset)), which)
    return best, which


def _check_density(check: CombinationCheck, kind: str, tally: _Tally) -> None:
    """dare_linear keeps each entry with probability density, dare_ties at most that (it also drops entries that
    disagree with the elected sign). Both keep something at each position where some source's entry survived its
    mask (ties: at least one survivor agrees with the sign they elect), which a combination that kept nothing fails."""
    d = check.combination.density
    for i, (kept, seen) in enumerate(zip(tally.kept, tally.seen, strict=True)):
        if not seen:
            continue
        share = kept / seen
        check.kept[i] = share
        spread = DENSITY_SIGMAS * math.sqrt(d * (1 - d) / seen) + 2 / seen
        too_many = share > d + spread
        too_few = kind == "dare_linear" and share < d - spread
        if too_many or too_few:
            check.failures.append(
                f"adapter {i}: the combined factors keep {share:.1%} of its {seen} entries; {kind} at density "
                f"{d:g} keeps {'about' if kind == 'dare_linear' else 'at most'} {d:.0%}"
            )
    if tally.positions and tally.filled < tally.expected - DENSITY_SIGMAS * math.sqrt(tally.variance) - 2:
        check.failures.append(
            f"the combined factors hold something at {tally.filled / tally.positions:.1%} of {tally.positions} "
            f"positions; {kind} at density {d:g} keeps at least {tally.expected / tally.positions:.1%} (wherever "
            "some source's entry survives its mask)"
        )
