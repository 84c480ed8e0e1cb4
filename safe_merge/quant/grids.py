"""The grid each quantization method puts weights on, and the rounding a weight suffers when it is quantized again
onto it (the weight budget of --quantized requantize; quant/formats.py explains the budgets)."""

from __future__ import annotations

import torch
from torch import nn

from safe_merge.errors import BadInput
from safe_merge.quant.formats import layer_method


def grid(module: nn.Module) -> tuple[str, int | None, float, float]:
    """(block layout, block size, largest gap between neighbouring levels on a scale of 1, relative rounding of
    the value before it is quantized) for a quantized layer. Read it before any forward pass (see
    verifier/quantized.py)."""
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
