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
from dataclasses import dataclass, field

import torch
from torch import nn

from safe_merge.errors import BadInput
from safe_merge.quant.stored.codec import CODEC_BITS, codec_name, stored_scheme

POLICIES = ("dequantize", "requantize", "refuse")
DEFAULT_POLICY = "dequantize"


@dataclass
class Quantization:
    """What the base is quantized with: read from config.json, refined by the loaded layers."""

    method: str
    bits: int | None
    scheme: str = ""
    modules: dict[str, str] = field(default_factory=dict)  # quantized module → its layer / weight class
    stored: str | None = None  # the codec that reads it as stored (quant/stored/), without its library

    def describe(self) -> str:
        bits = f"{self.bits}-bit" if self.bits else "unknown bits"
        return f"{self.method}, {bits}" + (f", {self.scheme}" if self.scheme else "")

    def report(self) -> dict:
        out = {"method": self.method, "bits": self.bits, "scheme": self.scheme, "modules": len(self.modules)}
        return {**out, "read_as_stored": self.stored} if self.stored else out


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
    codec = codec_name(quant)
    if codec is not None:
        groups = [g for g in (_get(quant, "config_groups") or {}).values() if isinstance(g, dict)]
        bits = (
            CODEC_BITS.get(codec)
            or _get(quant, "bits")
            or next((g.get("weights", {}).get("num_bits") for g in groups), None)
        )
        return Quantization(method, bits, stored_scheme(quant), stored=codec)
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
