"""What a combination of several adapters is: PEFT's add_weighted_adapter arguments as the user gave them,
checked on their own (a known type, one finite weight per adapter, the options that type uses), and the families
of types by how their result is derived. The reference math is combination_math.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from safe_merge.compat.history import History
from safe_merge.errors import BadInput
from safe_merge.verifier.combination_math import PRUNING, RANDOM, TASK_ON_FACTORS, TASK_THEN_SVD

SVD = TASK_THEN_SVD | {t for t in RANDOM if t.endswith("_svd")}
SAME_RANK = TASK_ON_FACTORS | (RANDOM - SVD)  # factors added entry by entry
UNCHECKABLE = RANDOM & SVD  # random masks, then an SVD: nothing to check against
NEEDS_DENSITY = RANDOM | PRUNING | {f"{t}_svd" for t in PRUNING}
SIGN_ELECTION = frozenset(t for t in NEEDS_DENSITY if "ties" in t)


@dataclass(frozen=True)
class Combination:
    """PEFT's add_weighted_adapter arguments, as the user gave them."""

    type: str
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign: str = "total"
    svd_rank: int | None = None

    def effective_type(self, n_adapters: int) -> str:
        """PEFT combines a single adapter linearly whatever the type asked for."""
        return "linear" if n_adapters == 1 else self.type

    def report(self) -> dict:
        out: dict = {"type": self.type, "weights": list(self.weights)}
        if self.density is not None:
            out["density"] = self.density
        if self.type in SIGN_ELECTION:
            out["majority_sign"] = self.majority_sign
        if self.svd_rank is not None:
            out["svd_rank"] = self.svd_rank
        return out


def parse_combination(
    type_: str, weights: Sequence[float] | None, n_adapters: int, density=None, majority_sign="total", svd_rank=None
) -> Combination:
    """Check the arguments themselves (not yet the adapters): known type, one finite weight per adapter, the
    options that type uses and no others."""
    known = sorted(History.load().combination_types)
    if type_ not in known:
        raise BadInput(f"unknown combination type {type_!r}", hint=f"use one of: {', '.join(known)}")
    weights = tuple(float(w) for w in weights) if weights else (1.0,) * n_adapters
    require_weight_count(weights, n_adapters)
    if not all(math.isfinite(w) for w in weights):
        raise BadInput(f"weights {list(weights)} are not all finite numbers", hint="give finite --weights")
    if type_ in NEEDS_DENSITY:
        if density is None:
            raise BadInput(f"combination {type_} prunes entries and needs --density", hint="e.g. --density 0.5")
        if not 0 < density <= 1:
            raise BadInput(f"--density {density} is outside (0, 1]", hint="the fraction of entries to keep, e.g. 0.5")
    elif density is not None:
        raise BadInput(f"--density has no effect on combination {type_}", hint="drop --density, or pick a pruning type")
    if svd_rank is not None and (type_ not in SVD or svd_rank < 1):
        raise BadInput(
            f"--svd-rank {svd_rank} needs a positive rank and an *svd combination type (got {type_})",
            hint=f"use one of {', '.join(sorted(SVD))}, or drop --svd-rank",
        )
    if majority_sign not in ("total", "frequency"):
        raise BadInput(f"--majority-sign {majority_sign!r}", hint="use total or frequency")
    return Combination(type_, weights, density, majority_sign, svd_rank)


def configured_rank(config: dict) -> int:
    """The rank PEFT sizes an adapter by when combining: the largest of r and its rank_pattern."""
    return max([int(config.get("r", 8)), *(config.get("rank_pattern") or {}).values()])


def svd_rank(combination: Combination, configs: Sequence[dict]) -> int:
    """The rank every module of an *svd combination is cut to: --svd-rank, else the largest configured rank."""
    return combination.svd_rank or max(configured_rank(c) for c in configs)


def require_weight_count(weights: Sequence[float], n_adapters: int) -> None:
    """One weight per adapter, whoever built the combination."""
    if len(weights) != n_adapters:
        raise BadInput(f"{len(weights)} weights for {n_adapters} adapters", hint="give one --weights value per adapter")
