"""Output-space verification: the merged model against the unmerged PeftModel, adapter active, on probes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from safe_merge.merger.probes import main_output
from safe_merge.merger.tolerance import OUTPUT_ULPS, output_tolerance


@dataclass
class OutputCheck:
    ran: bool
    max_abs: float = 0.0
    tol: float = 0.0
    effect: float = 0.0  # how far the adapter moves the outputs; a check that cannot see it proves little
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.ran and self.max_abs <= self.tol

    @property
    def discriminating(self) -> bool:
        """True when a merge that did nothing would have failed this check."""
        return self.effect > self.tol

    def report(self) -> dict:
        if not self.ran:
            return {"passed": None, "ran": False, "reason": self.reason}
        return {
            "passed": self.passed,
            "ran": True,
            "max_abs": self.max_abs,
            "tol": self.tol,
            "tol_rule": f"{OUTPUT_ULPS:g} ulps x sqrt(depth) of the largest reference output",
            "adapter_effect": self.effect,
            "discriminating": self.discriminating,
        }


def run(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return main_output(out).detach().to(torch.float64)


def model_depth(model: nn.Module) -> int:
    """Number of stacked layers, from the config when there is one (1 otherwise)."""
    config = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def check_outputs(reference: nn.Module, merged: nn.Module, inputs, dtype: torch.dtype) -> OutputCheck:
    """Compare merged outputs with the reference (an unmerged PeftModel, adapter active) in ``dtype``."""
    ref = run(reference, inputs)
    got = run(merged, inputs)
    if ref.shape != got.shape:
        return OutputCheck(
            True, float("inf"), 0.0, reason=f"output shapes differ: {tuple(ref.shape)} vs {tuple(got.shape)}"
        )
    effect = 0.0
    disable = getattr(reference, "disable_adapter", None)
    if disable is not None:
        with disable() if callable(disable) else contextlib.nullcontext():
            effect = float((run(reference, inputs) - ref).abs().max())
    diff = (ref - got).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if not torch.isfinite(got).all():
        max_abs = float("inf")
    return OutputCheck(True, max_abs, output_tolerance(ref, dtype, model_depth(merged)), effect)
