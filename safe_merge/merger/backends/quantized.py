"""Merging into a quantized base by policy, and verifying what was written against the unmerged model on the same
quantized base (the budgets are explained in quantized.py)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from safe_merge.compat.adapter_files import AdapterFiles, load_adapter
from safe_merge.errors import Unsupported
from safe_merge.io import loading
from safe_merge.merger.backends import peft as backend_peft
from safe_merge.quant.formats import (
    OUTPUT_FACTOR,
    SENSITIVITY_SEED,
    QuantCheck,
    Quantization,
    check_requantized_weights,
    float_twin,
    grid,
    quantized_modules,
)
from safe_merge.verifier.layer_kinds import layer_kinds
from safe_merge.verifier.ledger import build_ledger
from safe_merge.verifier.outputs import OutputCheck, model_depth, run
from safe_merge.verifier.probes import probe_inputs
from safe_merge.verifier.tolerance import output_tolerance
from safe_merge.verifier.verdict import Verification, adapter_precision, verify_models
from safe_merge.verifier.weights import WeightCheck, expected_params


def merge(base_dir: Path, adapter: AdapterFiles, policy: str, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    """dequantize: PEFT's merge into the float twin; requantize: PEFT's merge into the quantized layers."""
    model = loading.load_model(base_dir, dtype)
    if policy == "dequantize":
        model = float_twin(model, dtype)
    merged, notes = backend_peft.merge_model(model, adapter)
    # transformers 5 would reverse the conversions it applied when loading the quantized checkpoint, and has no
    # reverse for some; the layers already hold the quantized form it saves
    vars(merged).pop("_weight_conversions", None)
    return merged, notes


def verify(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, quant: Quantization, policy: str, dtype: torch.dtype
) -> Verification:
    """The written model against dequant(W) + ΔW (weights) and the unmerged model on the quantized base (outputs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_q = loading.load_model(base_dir, dtype)
        merged = loading.load_model(merged_dir, dtype)
    inputs = probe_inputs(loading.read_model_config(base_dir))
    return verify_loaded(base_q, merged, adapter_dir, quant, policy, dtype, inputs)


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
        check.sensitivity = _sensitivity(twin, expected, budgets, inputs)
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


def _sensitivity(twin: nn.Module, expected, budgets, inputs) -> float:
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
