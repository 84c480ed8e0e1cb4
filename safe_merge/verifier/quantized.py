"""Verifying a merge into a quantized base: the written model against dequant(W) + ΔW (weights, within the
method's rounding budget under requantize) and against the unmerged model on the same quantized base (outputs,
within float tolerance plus measured kernel noise and requantization sensitivity; quant/formats.py explains the
budgets)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from safe_merge.compat.adapter_files import load_adapter
from safe_merge.errors import Unsupported
from safe_merge.io import loading
from safe_merge.quant.formats import Quantization, float_twin, quantized_modules
from safe_merge.quant.grids import grid, rounding_budget
from safe_merge.verifier.checkpoint_files import file_problems
from safe_merge.verifier.layer_kinds import layer_kinds
from safe_merge.verifier.ledger import build_ledger
from safe_merge.verifier.outputs import OutputCheck, model_depth, run
from safe_merge.verifier.probes import probe_inputs
from safe_merge.verifier.tolerance import output_tolerance
from safe_merge.verifier.verdict import Verification, adapter_precision, verify_models
from safe_merge.verifier.weights import WeightCheck, expected_params

OUTPUT_FACTOR = 3.0
SENSITIVITY_SEED = 20261123
MIN_SURVIVAL = 0.5  # a requantized weight must carry at least half of ΔW along ΔW, or the merge mostly failed


@dataclass
class QuantCheck:
    """The quantized merge measured beside the usual checks: the output budget's parts, and the adapter's effect."""

    quant: Quantization
    policy: str
    output_max: float | None = None
    output_budget: float | None = None
    float_tolerance: float | None = None
    kernel_noise: float | None = None
    sensitivity: float = 0.0
    effect: float | None = None
    weight_max: float | None = None
    weight_worst: str | None = None
    survival: float | None = None  # the smallest share of ΔW a merged weight carries (requantize)
    failures: list[str] = field(default_factory=list)  # beyond the checks Verification already holds

    def report(self) -> dict:
        return {
            **self.quant.report(),
            "policy": self.policy,
            "weights_max_abs": self.weight_max,
            "worst_weight": self.weight_worst,
            "min_survival": self.survival,
            "outputs": {
                "max_abs": self.output_max,
                "budget": self.output_budget,
                "budget_rule": f"float tolerance + {OUTPUT_FACTOR:g} x (kernel noise + weight-budget sensitivity)",
                "float_tolerance": self.float_tolerance,
                "kernel_noise": self.kernel_noise,
                "sensitivity": self.sensitivity,
                "adapter_effect": self.effect,
            },
        }

    def warning(self) -> str:
        weights = (
            f"merged weights off dequant(W)+ΔW by at most {self.weight_max:.3g} (worst {self.weight_worst})"
            if self.weight_max is not None
            else "weights not compared"
        )
        outputs = (
            f"outputs off the unmerged model on the quantized base by {self.output_max:.3g} (budget "
            f"{self.output_budget:.3g}: kernel noise {self.kernel_noise:.3g}, requantization sensitivity "
            f"{self.sensitivity:.3g}; the adapter moves them by {self.effect:.3g})"
            if self.output_max is not None
            else "outputs not compared"
        )
        kept = f"; every merged weight carries at least {self.survival:.0%} of ΔW" if self.survival is not None else ""
        blind = (
            "; the output budget is as large as the adapter's effect, so only the weight check tells this merge "
            "from none"
            if self.output_budget is not None and self.effect is not None and self.output_budget >= self.effect
            else ""
        )
        return f"quantized base ({self.quant.describe()}), merged by {self.policy}: {weights}{kept}; {outputs}{blind}"


def check_requantized_weights(
    base_twin: Mapping[str, torch.Tensor],
    merged_twin: Mapping[str, torch.Tensor],
    merged_grids: Mapping[str, tuple[str, int | None, float, float]],
    expected: Mapping[str, torch.Tensor],
) -> tuple[list, list[str], dict[str, torch.Tensor]]:
    """Every merged weight against dequant(W) + ΔW within its rounding budget; a layer that did not move although
    the adapter asks it to is named, and so is any other parameter that moved. Returns the per-tensor results,
    the failures, the budgets (for the output sensitivity) and the share of ΔW each weight carries."""
    results, failures, budgets, survival = [], [], {}, {}
    for name, exact in sorted(expected.items()):
        module = name.removesuffix(".weight")
        start = base_twin[name].double()
        rounding = 4 * torch.finfo(merged_twin[name].dtype).eps * (exact.abs() + start.abs())
        if module in merged_grids and name.endswith(".weight"):
            budget = rounding_budget(merged_grids[module], exact) + rounding
        else:  # a float parameter of a quantized model (a bias, a head kept in float): float rounding only
            budget = rounding
        budgets[name] = budget
        result, failure, share = requantized_tensor(name, base_twin[name], exact, merged_twin[name], budget)
        results.append(result)
        failures += [failure] if failure else []
        if share is not None:
            survival[name] = share
    for name, value in sorted(merged_twin.items()):
        if name not in expected and name in base_twin and not torch.equal(value, base_twin[name]):
            moved = float((value.double() - base_twin[name].double()).abs().max())
            failures.append(f"{name}: changed by up to {moved:.3g}, though no adapter tensor touches it")
    return results, failures, budgets, survival


def requantized_tensor(
    name: str, base: torch.Tensor, exact: torch.Tensor, merged: torch.Tensor, budget: torch.Tensor
) -> tuple:
    """One requantized weight against dequant(W) + ΔW (``exact``, float64) within its rounding ``budget``:
    (its result, why it fails or None, the share of ΔW it carries along ΔW or None when ΔW is 0). A weight
    that did not move although the adapter moves it, or that carries less than half of ΔW, fails."""
    from safe_merge.verifier.weights import TensorResult

    got, start = merged.double(), base.double()
    delta = float((exact - start).abs().max())
    residual = (got - exact).abs()
    ratio_map = residual / budget.clamp(min=torch.finfo(torch.float64).tiny)
    worst = int(torch.argmax(ratio_map))
    result = TensorResult(
        name,
        float(residual.max()),
        float(residual.max()) / delta if delta else 0.0,
        float(ratio_map.flatten()[worst]),
        float(budget.flatten()[worst]),
        delta,
    )
    change = exact - start
    norm2 = float((change * change).sum())
    # how much of ΔW the merged weight carries, along ΔW: 1 exact, 0 nothing (rounding is unbiased)
    share = float(((got - start) * change).sum()) / norm2 if norm2 > 0 else None
    failure = None
    if delta > 0 and torch.equal(merged, base.to(merged.dtype)):
        lost = " (below the quantization step: requantizing loses it; use --quantized dequantize)"
        failure = f"{name}: the merge left it unchanged although the adapter moves it by up to {delta:.3g}" + (
            lost if delta <= float(budget.max()) else ""
        )
    elif result.ratio > 1:
        failure = (
            f"{name}: merged weight off dequant(W)+ΔW by {result.max_abs:.3g}, beyond its rounding budget "
            f"{result.tol:.3g} ({result.ratio:.3g}x; the adapter moves it by up to {delta:.3g})"
        )
    elif share is not None and share < MIN_SURVIVAL:
        failure = (
            f"{name}: the merged weight carries {share:.0%} of the adapter's change (along ΔW); "
            "requantizing lost most of it (use --quantized dequantize)"
        )
    return result, failure, share


def verify(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, quant: Quantization, policy: str, dtype: torch.dtype
) -> Verification:
    """The written model against dequant(W) + ΔW (weights) and the unmerged model on the quantized base (outputs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_q = loading.load_model(base_dir, dtype)
        merged = loading.load_model(merged_dir, dtype)
    inputs = probe_inputs(loading.read_model_config(base_dir))
    result = verify_loaded(base_q, merged, adapter_dir, quant, policy, dtype, inputs)
    result.config = file_problems(base_dir, adapter_dir, merged_dir)
    return result


def verify_loaded(
    base_q: nn.Module,
    merged: nn.Module,
    adapter_dir: Path,
    quant: Quantization,
    policy: str,
    dtype: torch.dtype,
    inputs,
) -> Verification:
    """verify() on loaded models (``base_q`` is consumed): HQQ bases exist only in memory."""
    adapter = load_adapter(adapter_dir)
    quant.modules = {name: type(m).__name__ for name, m in quantized_modules(base_q).items()}
    requantized = policy == "requantize"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = float_twin(base_q, dtype)
        base_params = {k: v.detach().clone() for k, v in twin.state_dict().items()}
        kinds = layer_kinds(twin)
        if requantized:
            # dequantized before any forward pass: bitsandbytes repacks 4-bit weights for its CPU kernel on the
            # first one, after which its dequantization no longer reads them right (measured: untouched layers
            # off by 0.1)
            merged_twin = float_twin(merged, dtype).state_dict()
            merged_grids = {name: grid(m) for name, m in quantized_modules(merged).items()}
        reference_q = loading.load_peft(base_q, adapter_dir)
        reference_f = loading.load_peft(copy.deepcopy(twin), adapter_dir)
        try:
            out_q = run(reference_q, inputs)
        except (AssertionError, RuntimeError, NotImplementedError) as exc:  # the quantization library's kernel
            raise Unsupported(
                f"the unmerged model on the quantized base cannot run here ({quant.method}'s kernel: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no message'}), so the "
                "merge cannot be compared with it"
            ) from exc
        out_f, got = run(reference_f, inputs), run(merged, inputs)
        with reference_q.disable_adapter():
            effect = float((run(reference_q, inputs) - out_q).abs().max())
    check = QuantCheck(quant, policy, kernel_noise=float((out_q - out_f).abs().max()), effect=effect)
    if not requantized:
        # exact up to float rounding: the usual verification against the unmerged model on dequant(W), plus the
        # comparison with the unmerged model on the quantized base below
        result = verify_models(adapter, base_params, kinds, merged, reference_f, inputs)
        check.float_tolerance = result.outputs.tol
        tensors = result.weights.tensors
    else:
        ledger = build_ledger(adapter, base_params, kinds, adapter_precision(dtype))
        expected = {name: e.value for name, e in expected_params(ledger, base_params).items()}
        tensors, failures, budgets, survival = check_requantized_weights(
            base_params, merged_twin, merged_grids, expected
        )
        check.survival = min(survival.values(), default=None)
        weights = WeightCheck(tensors=tensors, failures=failures)
        weights.rule = "per block: half the largest gap between grid levels x the block's scale, plus 4 ulps"
        check.sensitivity = sensitivity(twin, expected, budgets, inputs)
        check.float_tolerance = output_tolerance(out_q, dtype, model_depth(merged))
        result = Verification(ledger, weights, OutputCheck(False, reason="not run yet"))
    worst = max(tensors, key=lambda r: r.ratio, default=None)
    check.weight_max = max((r.max_abs for r in tensors), default=0.0)
    check.weight_worst = f"{worst.name} at {worst.ratio:.3g}x its tolerance" if worst else None
    check.output_budget = check.float_tolerance + OUTPUT_FACTOR * (check.kernel_noise + check.sensitivity)
    check.output_max = float((got - out_q).abs().max())
    if requantized:  # the quantized comparison is the output check
        result.outputs = OutputCheck(True, check.output_max, check.output_budget, effect, None)
    elif check.output_max > check.output_budget:
        check.failures.append(
            f"outputs differ from the unmerged model on the quantized base by {check.output_max:.3g} > budget "
            f"{check.output_budget:.3g}"
        )
    result.quantized = check
    return result


def sensitivity(twin: nn.Module, expected, budgets, inputs) -> float:
    """How far the outputs move when every exact merged weight is pushed by its rounding budget (one seeded draw,
    uniform within ±budget): the output error requantizing can explain."""
    exact = copy.deepcopy(twin)
    pushed = copy.deepcopy(twin)
    gen = torch.Generator().manual_seed(SENSITIVITY_SEED)
    with torch.no_grad():
        for name, value in expected.items():
            noise = (torch.rand(value.shape, generator=gen, dtype=torch.float64) * 2 - 1) * budgets[name]
            exact.get_parameter(name).copy_(value)
            pushed.get_parameter(name).copy_(value + noise)
    return float((run(pushed, inputs) - run(exact, inputs)).abs().max())
