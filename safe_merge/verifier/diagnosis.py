"""Name the likely cause of a merged tensor that failed, with the figure that shows it.

The change the merge made, M − W, is fitted by least squares on the adapter's rank-one parts s·b_j·a_jᵀ (one
coefficient c_j per rank): a correct merge has every c_j = 1. Every c_j alike names a scale error (0: not applied,
2: applied twice, −1: sign flipped, √r or 1/√r: α/√r and α/r confused); some at 0 and the rest at 1: part of the
rank left out. A change that fits none of them, but fits the transposed delta, was transposed; one that fits
nothing came from elsewhere (another module's delta, a wrong key). Only failed tensors are diagnosed.
"""

from __future__ import annotations

import math

import torch

from safe_merge.verifier.delta import LayerKind, ModuleLora

CLOSE = 0.02  # a coefficient within 2 % of a landmark is called that landmark


def diagnose(got: torch.Tensor, start: torch.Tensor, lora: ModuleLora | None, value: torch.Tensor) -> str:
    """A short phrase for the failure message ('' when nothing fits). ``start`` and ``value``: the tensor before
    the merge and its exact value after it (float64); ``lora``: the LoRA merged here, when it is one."""
    change = got.to(torch.float64) - start
    if not bool(torch.isfinite(change).all()):
        return ""
    if not bool(change.any()):
        return "not applied: the tensor equals the base"
    exact = value - start
    if lora is None or lora.magnitude is not None or lora.kind not in (LayerKind.LINEAR, LayerKind.LINEAR_FIFO):
        return _scalar(change, exact, lora)
    coefficients = _per_rank(change, lora.widened())
    if coefficients is None:
        return _scalar(change, exact, lora)
    kept = [c for c in coefficients if abs(c - 1) <= CLOSE]
    dropped = [c for c in coefficients if abs(c) <= CLOSE]
    if kept and dropped and len(kept) + len(dropped) == len(coefficients):
        return f"partial rank: {len(kept)} of {len(coefficients)} rank components applied, the others not"
    return _scalar(change, exact, lora, spread=max(coefficients) - min(coefficients))


def _scalar(change: torch.Tensor, exact: torch.Tensor, lora: ModuleLora | None, spread: float = 0.0) -> str:
    energy = float((exact * exact).sum())
    if energy == 0:
        return "changed although the exact change is zero"
    k = float((change * exact).sum()) / energy
    fit = float(((change - k * exact) ** 2).sum()) / max(float((change * change).sum()), 1e-300)
    if fit < 0.05 and spread <= 4 * CLOSE:  # the change is k times the delta
        return _named_scale(k, lora)
    if exact.dim() == 2 and exact.shape[0] == exact.shape[1]:
        transposed = exact.T
        kt = float((change * transposed).sum()) / energy
        if abs(kt - 1) <= 0.1 and float(((change - transposed) ** 2).sum()) < 0.05 * float((change * change).sum()):
            return "transposed: the change fits the delta's transpose, not the delta"
    return f"the change does not follow the adapter's delta (least-squares fit {k:.3g}x, {fit:.0%} left unexplained)"


def _named_scale(k: float, lora: ModuleLora | None) -> str:
    landmarks = {0.0: "not applied", 2.0: "applied twice", -1.0: "sign flipped", 1.0: "scale right"}
    if lora is not None and lora.rank > 1:
        root = math.sqrt(lora.rank)
        landmarks[root] = "α/√r used where α/r was meant (rsLoRA scale on a plain adapter)"
        landmarks[1 / root] = "α/r used where α/√r was meant (rsLoRA ignored)"
    for mark, name in landmarks.items():
        if abs(k - mark) <= CLOSE * max(1.0, abs(mark)):
            if mark == 1.0:
                return f"the change is {k:.4f}x the delta: a small scale error"
            return f"{name}: the change is {k:.3g}x the delta"
    return f"scale mismatch: the change is {k:.4g}x the delta"


def _per_rank(change: torch.Tensor, lora: ModuleLora) -> list[float] | None:
    """Least-squares coefficients of ``change`` on each rank-one part of the delta (None when they are not
    separable, e.g. two parts parallel)."""
    a, b = lora.a, lora.b  # [r, in], [out, r]
    if lora.kind is LayerKind.LINEAR_FIFO:
        change = change.T
    gram = (b.T @ b) * (a @ a.T) * (lora.scale**2)
    rhs = torch.einsum("or,oi,ri->r", b, change, a) * lora.scale
    try:
        solved = torch.linalg.solve(gram, rhs)
    except RuntimeError:
        return None
    if not bool(torch.isfinite(solved).all()):
        return None
    if float(torch.linalg.cond(gram)) > 1e10:
        return None
    return [float(c) for c in solved]
