"""Quantized bases: which method and how many bits, a float twin of the base (its dequantized weights), and the
merge error measured against a budget that follows from the method.

Policies (`--quantized`):
- dequantize (default): merge into dequant(W) and write a float model. The adapter was trained on dequant(W), so
  the merged model is the unmerged PeftModel up to float rounding; the only cost is size.
- requantize: PEFT's merge into the quantized layers (dequantize, add, quantize again); the output stays
  quantized, and every merged weight is rounded once more onto the method's grid.
- refuse: exit 2.

Budgets. Weights (requantize): a grid with levels l_i scaled per block (bitsandbytes 4-bit: blocks of 64 of the
flattened weight, levels from the saved code; LLM.int8 and torchao int8: per output row, 127 steps a side; HQQ:
per group, 2^bits - 1 steps between the group's min and max, with HQQ's fitted zero point allowed a whole step)
rounds each element by at most half the largest gap between neighbouring levels times the block's scale, taken
from the exact merged weight dequant(W) + ΔW. Outputs: the unmerged model itself computes through quantized
kernels (bitsandbytes' int8 matmul casts its inputs to float16), so its distance to the same model computed on
dequant(W) is measured (kernel noise N); requantize adds how far the outputs move when the exact merged weights are
pushed by the weight budget (S, one seeded draw, uniform within the budget). Budget: float tolerance + 3 (N + S).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from safe_merge.errors import BadInput

POLICIES = ("dequantize", "requantize", "refuse")
DEFAULT_POLICY = "dequantize"
OUTPUT_FACTOR = 3.0
SENSITIVITY_SEED = 20261123
MIN_SURVIVAL = 0.5  # a requantized weight must carry at least half of ΔW along ΔW, or the merge mostly failed


@dataclass
class Quantization:
    """What the base is quantized with: read from config.json, refined by the loaded layers."""

    method: str
    bits: int | None
    scheme: str = ""
    modules: dict[str, str] = field(default_factory=dict)  # quantized module → its layer / weight class

    def describe(self) -> str:
        bits = f"{self.bits}-bit" if self.bits else "unknown bits"
        return f"{self.method}, {bits}" + (f", {self.scheme}" if self.scheme else "")

    def report(self) -> dict:
        return {"method": self.method, "bits": self.bits, "scheme": self.scheme, "modules": len(self.modules)}


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def from_config(config) -> Quantization | None:
    """The quantization a model config declares (None: not quantized, as far as the config says)."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    if not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)
    method = str(_get(quant, "quant_method", "unknown"))
    if method == "bitsandbytes":
        if _get(quant, "load_in_4bit") or _get(quant, "_load_in_4bit"):
            kind = _get(quant, "bnb_4bit_quant_type", "fp4")
            double = ", double-quantized scales" if _get(quant, "bnb_4bit_use_double_quant") else ""
            return Quantization(method, 4, f"{kind} in blocks of 64{double}")
        return Quantization(method, 8, "LLM.int8, per output row")
    if method == "torchao":
        kind = _get(quant, "quant_type")
        name = kind.get("default", {}).get("_type") if isinstance(kind, dict) else str(kind)
        bits = 8 if name and "Int8" in name else 4 if name and "Int4" in name else None
        return Quantization(method, bits, str(name))
    bits = _get(quant, "bits") or _get(quant, "nbits") or _get(quant, "w_bit")
    return Quantization(method, int(bits) if bits else None, str(_get(quant, "group_size", "") or ""))


def layer_method(module: nn.Module) -> str | None:
    """The quantization a loaded layer uses, from its class (never imports a quantization library)."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if name in ("Linear4bit", "Linear8bitLt"):
        return "bitsandbytes"
    if hasattr(module, "W_q") and name == "HQQLinear":
        return "hqq"
    if weight is not None and type(weight).__module__.startswith("torchao."):
        return "torchao"
    if name in ("QuantLinear", "WQLinear_GEMM", "WQLinear_GEMV", "QLinear", "MarlinQuantLinear"):
        return name
    return None


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized layer, by its path."""
    return {name: m for name, m in model.named_modules() if layer_method(m) is not None}


def detect(config, model: nn.Module | None = None) -> Quantization | None:
    """The config's declaration, or the loaded layers' classes when the config says nothing."""
    quant = from_config(config)
    layers = quantized_modules(model) if model is not None else {}
    if quant is None and layers:
        methods = sorted({layer_method(m) for m in layers.values()})
        quant = Quantization(methods[0], _layer_bits(next(iter(layers.values()))))
    if quant is not None:
        quant.modules = {name: type(m).__name__ for name, m in layers.items()}
    return quant


def _layer_bits(module: nn.Module) -> int | None:
    name = type(module).__name__
    if name == "Linear4bit":
        return 4
    if name == "Linear8bitLt" or layer_method(module) == "torchao":
        return 8
    meta = getattr(module, "meta", None)  # HQQLinear keeps its settings in a dict
    return meta.get("nbits") if isinstance(meta, dict) else None


LIBRARIES = {"bitsandbytes": "bitsandbytes", "torchao": "torchao", "hqq": "hqq"}


def require_library(quant: Quantization, config_path) -> None:
    """Loading a quantized checkpoint needs its library; say which, before transformers fails deep inside."""
    import importlib.util

    library = LIBRARIES.get(quant.method)
    if library is None:
        raise BadInput(
            f"the base is quantized with {quant.describe()}, which safe-merge cannot dequantize or merge into",
            path=config_path,
            key="quantization_config",
            hint="merge into the unquantized base model, then quantize the merged model",
        )
    if importlib.util.find_spec(library) is None:
        raise BadInput(
            f"the base is quantized with {quant.describe()} and {library} is not installed",
            path=config_path,
            key="quantization_config",
            hint=f"pip install {library} (or safe-merge[quant]), or merge into the unquantized base",
        )


def refuse(quant: Quantization, config_path) -> None:
    raise BadInput(
        f"the base is quantized ({quant.describe()}) and --quantized refuse was given",
        path=config_path,
        key="quantization_config",
        hint="--quantized dequantize merges into the dequantized weights and writes a float model (exact); "
        "--quantized requantize keeps it quantized and reports the rounding it adds",
    )


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """dequant(W) of one quantized layer, with the installed PEFT's own helper (the same numbers its merge uses)."""
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module).detach()


def float_twin(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The same model with every quantized layer replaced by a plain nn.Linear holding dequant(W) in ``dtype``, and
    no quantization in its config: what the adapter was trained on, as a float model."""
    twin = copy.deepcopy(model)
    for name, module in quantized_modules(twin).items():
        weight = dequantized_weight(module).to(dtype)
        bias = getattr(module, "bias", None)
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if bias is not None:
                plain.bias.copy_(bias.detach().to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, plain)
    config = getattr(twin, "config", None)
    if config is not None:
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
    # transformers 5 remembers how it converted the quantized checkpoint on loading, and reverses that on saving
    quantizer_state = ("hf_quantizer", "is_quantized", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit")
    for attr in (*quantizer_state, "_weight_conversions"):
        if attr in vars(twin):
            delattr(twin, attr)
    return twin


# ---------------------------------------------------------------------------------------------------------------
# Weight budget for requantize: half the largest gap between neighbouring levels, times each block's scale


def grid(module: nn.Module) -> tuple[str, int | None, float, float]:
    """(block layout, block size, largest gap between neighbouring levels on a scale of 1, relative rounding of
    the value before it is quantized) for a quantized layer. Read it before any forward pass (see
    quantized_merge.verify)."""
    method = layer_method(module)
    weight = module.weight if hasattr(module, "weight") else None
    if type(module).__name__ == "Linear4bit":
        state = weight.quant_state
        code = torch.sort(state.code.float().flatten()).values
        return "flat", int(state.blocksize), float((code[1:] - code[:-1]).max()), 0.0
    if type(module).__name__ == "Linear8bitLt":  # LLM.int8 quantizes a float16 copy of the weight
        return "row", None, 1.0 / 127.0, float(torch.finfo(torch.float16).eps)
    if method == "torchao":
        return "row", None, 1.0 / 127.0, 0.0
    if method == "hqq":
        meta = module.meta
        steps = 2 ** int(meta["nbits"]) - 1
        # the group's range is the scale here (levels from min to max); HQQ fits its zero point: a whole step
        return "group", int(meta["group_size"]), 2.0 / steps, 0.0
    raise BadInput(f"no rounding model for {type(module).__name__} layers", hint="use --quantized dequantize")


def rounding_budget(levels: tuple[str, int | None, float, float], exact: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |dequant(quant(exact)) - exact| on a layer's grid (``grid(layer)``)."""
    layout, block, gap, working = levels
    value = exact.double()
    before = working * value.abs()  # rounding to the working precision the quantizer starts from
    if layout == "row":
        scale = value.abs().amax(dim=1, keepdim=True).expand_as(value)
        return gap / 2 * scale + before
    flat = value.reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    if layout == "flat":
        scale = blocks.abs().amax(dim=1, keepdim=True)
        bound = gap / 2 * scale
    else:  # hqq group: range max - min, one whole step for the fitted zero point
        scale = (blocks.amax(dim=1, keepdim=True) - blocks.amin(dim=1, keepdim=True)) / 2
        bound = gap * scale
    return bound.expand_as(blocks).reshape(-1)[: flat.numel()].reshape(value.shape) + before


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
    from safe_merge.verifier.weights import TensorResult

    results, failures, budgets, survival = [], [], {}, {}
    for name, exact in sorted(expected.items()):
        module = name.removesuffix(".weight")
        got = merged_twin[name].double()
        start = base_twin[name].double()
        delta = float((exact - start).abs().max())
        rounding = 4 * torch.finfo(merged_twin[name].dtype).eps * (exact.abs() + start.abs())
        if module in merged_grids and name.endswith(".weight"):
            budget = rounding_budget(merged_grids[module], exact) + rounding
        else:  # a float parameter of a quantized model (a bias, a head kept in float): float rounding only
            budget = rounding
        budgets[name] = budget
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
        results.append(result)
        change = exact - start
        norm2 = float((change * change).sum())
        if norm2 > 0:  # how much of ΔW the merged weight carries, along ΔW: 1 exact, 0 nothing (rounding is unbiased)
            survival[name] = float(((got - start) * change).sum()) / norm2
        if delta > 0 and torch.equal(merged_twin[name], base_twin[name]):
            lost = " (below the quantization step: requantizing loses it; use --quantized dequantize)"
            failures.append(
                f"{name}: the merge left it unchanged although the adapter moves it by up to {delta:.3g}"
                + (lost if delta <= float(budget.max()) else "")
            )
        elif result.ratio > 1:
            failures.append(
                f"{name}: merged weight off dequant(W)+ΔW by {result.max_abs:.3g}, beyond its rounding budget "
                f"{result.tol:.3g} ({result.ratio:.3g}x; the adapter moves it by up to {delta:.3g})"
            )
        elif survival.get(name, 1.0) < MIN_SURVIVAL:
            failures.append(
                f"{name}: the merged weight carries {survival[name]:.0%} of the adapter's change (along ΔW); "
                f"requantizing lost most of it (use --quantized dequantize)"
            )
    for name, value in sorted(merged_twin.items()):
        if name not in expected and name in base_twin and not torch.equal(value, base_twin[name]):
            moved = float((value.double() - base_twin[name].double()).abs().max())
            failures.append(f"{name}: changed by up to {moved:.3g}, though no adapter tensor touches it")
    return results, failures, budgets, survival
