"""What a combination of LoRA adapters means for one module, computed in float64 from each adapter's own tensors
and scale: the reference a multi-adapter merge is checked against.

PEFT's add_weighted_adapter is not the reference. In PEFT 0.21.2 it builds the combined adapter with its source's
`use_rslora`, so rsLoRA sources come out sqrt(r) times too large (measured: a single r=4 adapter "combined" with
weight 1 doubles; upstream issue huggingface/peft#3761).

Families (PEFT's definitions, 0.9+):
- cat: the weighted sum of the adapters' own deltas, exactly.
- linear / ties / magnitude_prune: the A matrices and the B matrices are each combined as task tensors, with
  weights sqrt(|w·s|) (the sign on A), and the delta is B·A of the results.
- *_svd: the weighted deltas are combined as task tensors, then cut to their best rank-k approximation
  (k = svd_rank, else the largest source rank).
- dare_*: random masks, which cannot be derived again: no delta here; combination_check tests each combined
  factor entry against every subset the masks could have kept instead.
PEFT runs a single adapter as "linear" whatever the type (Combination.effective_type); a module that only some
of several adapters target is combined from those, with the type asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from safe_merge.compat.history import History
from safe_merge.errors import Unsupported
from safe_merge.verifier.delta import ModuleLora, low_rank_delta

# Every add_weighted_adapter type, by how its result is derived (combination.py builds its sets from these).
EXACT = frozenset({"cat"})
TASK_ON_FACTORS = frozenset({"linear", "ties", "magnitude_prune"})
TASK_THEN_SVD = frozenset({"svd", "ties_svd", "magnitude_prune_svd"})
RANDOM = frozenset({"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"})
PRUNING = frozenset({"ties", "magnitude_prune"})  # need a density, with their *_svd forms and every dare type


def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) largest-magnitude entries, zero the rest."""
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k).indices] = 1
    return (flat * mask).reshape(tensor.shape)


def task_combine(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    density: float | None,
    majority: str = "total",
) -> torch.Tensor:
    """Combine same-shaped task tensors: plain weighted sum, magnitude-pruned sum, or TIES (prune, elect the
    majority sign per entry on the unweighted tensors, average the weighted entries that agree with it)."""
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.dim() - 1))
    if method in ("linear", "svd"):
        return (stacked * w).sum(0)
    if density is None:
        raise ValueError(f"{method} needs a density")
    pruned = torch.stack([prune_magnitude(t, density) for t in tensors])
    if method.startswith("magnitude_prune"):
        return (pruned * w).sum(0)
    signs = pruned.sign()
    votes = pruned.sum(0) if majority == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0)
    kept = (pruned * w * agree).sum(0)
    return kept / agree.sum(0).clamp(min=1)


def factor_weights(
    loras: Sequence[ModuleLora], weights: Sequence[float], release: str | None = None
) -> tuple[list[float], list[float]]:
    """Entrywise types weight A by sign(w·s)·sqrt(|w·s|) and B by sqrt(|w·s|): their product carries w·s.

    Releases before 0.9.0 (``release``; None is the current meaning) split w·s between the factors otherwise, which
    changes the cross terms B_i·A_j when adapters have different scales: 0.4-0.6 put w·s on A and 1 on B, 0.7-0.8
    sqrt(w)·s on A and sqrt(w) on B (history.json boundaries).
    """
    scales = [lora.scale for lora in loras]
    history = History.load()
    if release is not None and history.affected("linear_weight_on_a_only", release):
        return [w * s for w, s in zip(weights, scales, strict=True)], [1.0] * len(loras)
    if release is not None and history.affected("linear_sqrt_weight_scale_on_a", release):
        roots = [math.sqrt(abs(w)) for w in weights]
        signed = [math.copysign(r * s, w) for r, s, w in zip(roots, scales, weights, strict=True)]
        return signed, roots
    scaled = [w * s for s, w in zip(scales, weights, strict=True)]
    return [math.copysign(math.sqrt(abs(x)), x) for x in scaled], [math.sqrt(abs(x)) for x in scaled]


def task_delta(
    loras: Sequence[ModuleLora], weights: Sequence[float], combination: str, density: float | None, majority: str
) -> torch.Tensor:
    """What an *svd type combines before its cut: the weighted deltas, as linear / ties / magnitude_prune."""
    method = combination.removesuffix("_svd")
    return task_combine([low_rank_delta(lora) for lora in loras], weights, method, density, majority)


def best_rank(full: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of a delta (its output axis against the rest), and all its singular
    values (how sharply that cut is determined)."""
    matrix = full.reshape(full.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(full.shape), s


def combined_delta(
    loras: Sequence[ModuleLora],
    weights: Sequence[float],
    combination: str,
    *,
    density: float | None = None,
    majority: str = "total",
    svd_rank: int | None = None,
    release: str | None = None,
) -> torch.Tensor:
    """The float64 delta one module gets from combining ``loras`` with ``weights`` (stored-weight layout), as
    ``release`` defines the type (None: as current PEFT does)."""
    if combination in RANDOM:
        raise Unsupported(f"{combination} draws random masks; its result cannot be derived again to check it")
    if combination in EXACT:
        return sum(w * low_rank_delta(lora) for lora, w in zip(loras, weights, strict=True))
    if combination in TASK_ON_FACTORS:
        kind = loras[0].kind
        weights_a, weights_b = factor_weights(loras, weights, release)
        a = task_combine([lora.a for lora in loras], weights_a, combination, density, majority)
        b = task_combine([lora.b for lora in loras], weights_b, combination, density, majority)
        return low_rank_delta(ModuleLora(loras[0].module, kind, a, b, 1.0))
    if combination in TASK_THEN_SVD:
        full = task_delta(loras, weights, combination, density, majority)
        return best_rank(full, svd_rank or max(lora.rank for lora in loras))[0]
    raise ValueError(f"unknown combination type {combination!r}")
