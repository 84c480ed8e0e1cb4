"""FP8 (e4m3) weights with a grid of scales: transformers' fine-grained FP8 (quant_method "fp8": ``weight`` and
``weight_scale_inv`` per block, DeepSeek-V3/R1, Qwen3-FP8) and compressed-tensors' float-quantized format
(``weight`` and ``weight_scale`` per tensor, channel, group or block).

Every strategy is a grid of tiles: per tensor one tile of the whole weight, per channel 1 × in, per group 1 × g,
per block the configured block. The scale grid is the ceil grid (the last tiles cut at the edge), as DeepSeek
stores it and vLLM reads it; transformers 5.17–5.24 infers the tile from ``rows // scale_rows`` instead, which
is the same for shapes the block divides, and silently wrong (or an error) for the others.

Dequantize: transformers multiplies in float32 and rounds once to the model's dtype; compressed-tensors
multiplies in the scale's dtype (for half-precision scales that is the float32 product rounded once). Quantize:
transformers scales by 448/amax in float32, clamps and rounds to e4m3, and stores the reciprocal; compressed-
tensors divides by amax/448 computed in the scale's dtype. Each element then rounds by at most half an e4m3
step: 2^-4 of its magnitude above the subnormals, 2^-10 of the tile's scale below them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from safe_merge.io.checkpoint import TensorInfo
from safe_merge.quant.stored.codec import Group, Reader, block_amax, scale_grid, sibling_parts, tile
from safe_merge.quant.stored.schemes import scheme_tiles

E4M3_MAX = 448.0
HALF_STEP = 2.0**-4  # half the gap between neighbouring normal e4m3 values, relative to the value
SUBNORMAL_HALF_STEP = 2.0**-10  # half the subnormal gap (2^-9), in units of the scale
E8M0 = getattr(torch, "float8_e8m0fnu", None)
FP8_PARTS = {"weight": "weight", "scale": "weight_scale_inv"}  # role → the name after the module's
CT_FP8_PARTS = {"weight": "weight", "scale": "weight_scale"}


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float32: power-of-two exponents stored as bytes (ue8m0) are 2^(byte - 127)."""
    if scale.dtype == torch.uint8:
        return (scale.float() - 127.0).exp2()
    return scale.float()


class BlockFP8:
    """transformers' fine-grained FP8: ``X.weight`` e4m3 and ``X.weight_scale_inv`` (float32, or ue8m0 bytes)."""

    name = "fp8_block"

    def groups(self, tensors: Mapping[str, TensorInfo], quant: Mapping, read: Reader) -> list[Group]:
        block = quant.get("weight_block_size")
        out = []
        for name, info in tensors.items():
            if not name.endswith(".weight") or info.dtype != torch.float8_e4m3fn:
                continue
            # static activations' scale: kept as stored
            parts = sibling_parts(tensors, name, FP8_PARTS, {"activation_scale": "activation_scale"})
            if parts is not None:
                out.append(Group(name, info.shape, parts, {"block": tuple(block) if block else None}))
        return out

    def dequantize(self, group: Group, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        rows, cols = group.shape[-2:]
        scale = scale_grid(scale_to_float(parts["scale"]), rows, cols, tile(group))
        return (parts["weight"].float() * scale).to(dtype)

    def quantize(self, group: Group, weight: torch.Tensor, stored: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
        rows, cols = group.shape[-2:]
        value = weight.float()
        amax = block_amax(value, tile(group))
        scales = E4M3_MAX / torch.where(amax > 0, amax, torch.ones_like(amax))
        kept = stored[group.parts["scale"]].dtype
        if kept in (torch.uint8, E8M0):  # ue8m0: the reciprocal rounded up to a power of two
            inverse = torch.exp2(torch.ceil(torch.log2((1.0 / scales).clamp(min=torch.finfo(torch.float32).tiny))))
            scales = 1.0 / inverse
        codes = (value * scale_grid(scales, rows, cols, tile(group))).clamp(-E4M3_MAX, E4M3_MAX)
        inverse = (1.0 / scales).float()
        if kept == torch.uint8:
            inverse = (torch.log2(inverse) + 127).round().to(torch.uint8)
        else:
            inverse = inverse.to(kept)
        return {"weight": codes.to(torch.float8_e4m3fn), "scale": inverse.reshape(stored[group.parts["scale"]].shape)}

    def budget(self, group: Group, exact: torch.Tensor) -> torch.Tensor:
        rows, cols = exact.shape[-2:]
        unit = block_amax(exact, tile(group)) / E4M3_MAX * 2  # ue8m0 rounds the scale up by less than 2x
        return exact.abs() * HALF_STEP + scale_grid(unit, rows, cols, tile(group)) * SUBNORMAL_HALF_STEP


class FloatQuantized:
    """compressed-tensors' float-quantized format: ``X.weight`` e4m3 and ``X.weight_scale``."""

    name = "ct_float"

    def groups(self, tensors: Mapping[str, TensorInfo], quant: Mapping, read: Reader) -> list[Group]:
        out = []
        for name, info in tensors.items():
            if not name.endswith(".weight") or info.dtype != torch.float8_e4m3fn:
                continue
            parts = sibling_parts(tensors, name, CT_FP8_PARTS, {e: e for e in ("input_scale", "weight_zero_point")})
            if parts is not None:
                out.append(Group(name, info.shape, parts, {"block": scheme_tiles(quant, name, info.shape)}))
        return out

    def dequantize(self, group: Group, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        rows, cols = group.shape[-2:]
        scale = parts["scale"].reshape(1, 1) if parts["scale"].dim() < 2 else parts["scale"]
        spread = scale_grid(scale, rows, cols, tile(group))
        return (parts["weight"].to(scale.dtype) * spread).to(dtype)

    def quantize(self, group: Group, weight: torch.Tensor, stored: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
        rows, cols = group.shape[-2:]
        kept = stored[group.parts["scale"]]
        value = weight.to(kept.dtype)
        scale = block_amax(value, tile(group)) / torch.tensor(E4M3_MAX, dtype=kept.dtype)
        scale = torch.where(scale == 0, torch.finfo(kept.dtype).eps, scale)
        codes = (value / scale_grid(scale, rows, cols, tile(group))).clamp(-E4M3_MAX, E4M3_MAX)
        return {"weight": codes.to(torch.float8_e4m3fn), "scale": scale.reshape(kept.shape)}

    def budget(self, group: Group, exact: torch.Tensor) -> torch.Tensor:
        rows, cols = exact.shape[-2:]
        unit = block_amax(exact, tile(group)) / E4M3_MAX * (1 + 2.0**-6)  # the scale rounded to its dtype
        # the division is rounded to the scale's dtype before e4m3: a second rounding of up to 2^-8 relative
        return exact.abs() * (HALF_STEP + 2.0**-7) + scale_grid(unit, rows, cols, tile(group)) * SUBNORMAL_HALF_STEP
