"""Output-space verification: the merged model against the unmerged PeftModel, adapter active, on probes."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from safe_merge.verifier import routing
from safe_merge.verifier.probes import main_output
from safe_merge.verifier.tolerance import NOISE_FACTOR, OUTPUT_ULPS, output_tolerance


@dataclass
class OutputCheck:
    ran: bool
    max_abs: float = 0.0
    tol: float = 0.0
    effect: float = 0.0  # how far the adapter moves the outputs; a check that cannot see it proves little
    noise: float | None = None  # reference's + merged model's distance from their float64 twins (None: not measured)
    reason: str = ""
    optional: bool = False  # not run by choice (the stream backend's memory rule, or asked): not a gap
    fixed_routers: int = 0  # MoE routers whose choice the merged model took from the unmerged one (routing.py)

    @property
    def passed(self) -> bool:
        return self.ran and self.max_abs <= self.tol

    @property
    def discriminating(self) -> bool:
        """True when a merge that did nothing would have failed this check."""
        return self.effect > self.tol

    def report(self) -> dict:
        if not self.ran:
            return {"passed": None, "ran": False, "reason": self.reason, "optional": self.optional}
        return {
            "passed": self.passed,
            "ran": True,
            "max_abs": self.max_abs,
            "tol": self.tol,
            "tol_rule": f"max({OUTPUT_ULPS:g} ulps x sqrt(depth) of the largest reference output, "
            f"{NOISE_FACTOR:g} x the two models' own rounding noise against float64)",
            "rounding_noise": self.noise,
            "adapter_effect": self.effect,
            "discriminating": self.discriminating,
            "routing_held_fixed": self.fixed_routers,
        }


def run(model: nn.Module, inputs) -> torch.Tensor:
    """Run on the probe inputs (floating inputs cast to the model's dtype); the main output as float64."""
    dtype = next(model.parameters()).dtype
    if isinstance(inputs, dict):
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        # a PeftModel's task wrapper passes inputs of its own (Whisper's seq2seq one passes input_ids=None):
        # the model inside, with the adapter's layers active, takes the probe as the plain model does
        forward = model.base_model if hasattr(model, "get_base_model") else model
        with torch.no_grad():
            out = forward(**inputs)
    else:
        with torch.no_grad():
            out = model(inputs.to(dtype) if inputs.is_floating_point() else inputs)
    return main_output(out).detach().to(torch.float64)


def model_depth(model: nn.Module) -> int:
    """Number of stacked layers, from the config when there is one (1 otherwise)."""
    config = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def rounding_noise(
    model: nn.Module, inputs, out: torch.Tensor, routes: dict | None = None, twin: bool | None = None
) -> float | None:
    """max |model in its dtype − the same model in float64|: the rounding it does itself on these inputs.

    Needs a float64 copy; skipped (None) when that would not fit in half the free memory (or ``twin`` False: a
    plan decided so beforehand), or when the model's code cannot run in float64 (transformers 4.40's OPT mask
    overflows there): the ulps floor then stands alone.
    """
    numel = sum(p.numel() for p in model.parameters())
    made = float64_copy_fits(numel, available_memory()) if twin is None else twin
    if not made:
        return None
    copy64 = float64_copy(model)
    _eager_experts(copy64)
    try:
        with routing.replaying(copy64, routes or {}):  # the twin routes as the check's models do
            return float((run(copy64, inputs) - out).abs().max())
    except RuntimeError:
        return None
    finally:
        del copy64


def float64_copy_fits(numel: int, free: int) -> bool:
    """The rule for the float64 copy that measures rounding: made when it takes at most half the free memory
    (the one rule rounding_noise applies and both backends' --plan state)."""
    return numel * 8 <= free // 2


def float64_copy(model: nn.Module) -> nn.Module:
    """``model`` in float64, its floating parameters converted as they are copied: the copy never holds them in
    their own dtype as well (a whole copy first, then converted, held up to 2.2 GB more at once on a 1.1B bfloat16
    model). Parameters shared within the model stay shared."""
    memo: dict[int, object] = {}
    for param in model.parameters():  # each shared parameter once
        if type(param) is nn.Parameter and param.is_floating_point():
            memo[id(param)] = nn.Parameter(param.detach().to(torch.float64), requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo).to(torch.float64)  # the rest (floating buffers) as before


def _eager_experts(model: nn.Module) -> None:
    """transformers 5 runs MoE experts with grouped matmul kernels that take no float64; its eager loop computes
    the same and takes any dtype, so the float64 twin uses that."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    setter = getattr(inner, "set_experts_implementation", None)
    if setter is not None and getattr(getattr(inner, "config", None), "_experts_implementation", None):
        try:
            setter("eager")
        except (ValueError, ImportError):
            pass


def _sum_or_none(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def available_memory() -> int:
    """Bytes a new allocation can have without swapping: the kernel's MemAvailable (free memory and the page cache
    it can drop), else the free pages alone. Free pages alone shrink as a merge's written shards fill the page
    cache: measured here, 3.7 GB "free" beside 23.5 GB available after one 1.1B merge."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def resident_memory() -> int:
    """This process's resident set now (the interpreter, torch, what is already loaded): a plan's estimate of a
    peak starts from it. The peak so far where the current figure cannot be read."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        try:
            import resource
        except ImportError:  # no POSIX resource accounting: the estimate then starts from nothing held
            return 0
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def check_outputs(
    reference: nn.Module, merged: nn.Module, inputs, dtype: torch.dtype, twin: bool | None = None
) -> OutputCheck:
    """Compare merged outputs with the reference (an unmerged PeftModel, adapter active) in ``dtype``; an MoE
    model's routing is the reference's in every run that is compared with it (routing.py). ``twin``: whether the
    float64 copies that measure rounding are made (None: when they fit in memory now)."""
    routes: dict = {}
    with routing.recording(reference, routes):
        ref = run(reference, inputs)
    with routing.replaying(merged, routes):
        got = run(merged, inputs)
    if ref.shape != got.shape:
        return OutputCheck(
            True, float("inf"), 0.0, reason=f"output shapes differ: {tuple(ref.shape)} vs {tuple(got.shape)}"
        )
    if not torch.isfinite(ref).all():
        return OutputCheck(
            False,
            reason=f"the unmerged model's own outputs overflow in {str(dtype).removeprefix('torch.')} "
            "(inf or NaN), so they cannot be compared",
        )
    effect = 0.0
    disable = getattr(reference, "disable_adapter", None)
    if disable is not None:
        with warnings.catch_warnings(), disable():  # PEFT warns that trained biases stay on; known, measured anyway
            warnings.simplefilter("ignore")
            effect = float((run(reference, inputs) - ref).abs().max())
    noise = _sum_or_none(
        rounding_noise(reference, inputs, ref, routes, twin), rounding_noise(merged, inputs, got, routes, twin)
    )
    diff = (ref - got).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if not torch.isfinite(got).all():
        max_abs = float("inf")
    tol = output_tolerance(ref, dtype, model_depth(merged), noise)
    return OutputCheck(True, max_abs, tol, effect, noise, fixed_routers=len(routes))
