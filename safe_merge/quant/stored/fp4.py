"""FP4 (e2m1) codes, two to a byte with the even element in the low nibble, scaled per group: gpt-oss's MXFP4
experts (``X_blocks`` [E, out, G, 16] and ``X_scales`` [E, out, G] of 2^(s - 127) per 32 inputs; the model sees
X as [E, in, out]) and compressed-tensors' nvfp4-pack-quantized (``weight_packed`` [out, in/2], an e4m3
``weight_scale`` per 16 inputs and a float32 ``weight_global_scale``).

Dequantize: MXFP4 as transformers does (the level times 2^(s-127), rounded once to the model's dtype); NVFP4
as compressed-tensors does (level · (scale / global scale) in float32, rounded once). Quantize: MXFP4 as
triton_kernels' downcast does (the scale amax/6 rounded up to a power of two), NVFP4 as compressed-tensors
does (global scale 448·6/amax, group scale amax/6 times it rounded to e4m3); both round to the nearest level,
ties to even, saturating at 6. An element rounds by at most half the gap around it: max(scale/4, |x|/4).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from safe_merge.io.checkpoint import TensorInfo
from safe_merge.quant.stored.codec import Group, Reader, block_amax, scale_grid, sibling_parts

LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_PARTS = {"codes": "weight_packed", "scale": "weight_scale", "global": "weight_global_scale"}


def lut(dtype: torch.dtype) -> torch.Tensor:
    """The 16 code values, sign in bit 3."""
    return torch.tensor([*LEVELS, *(-v for v in LEVELS)], dtype=dtype)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 → [..., 2n] codes, the low nibble first."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def pack(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def round_levels(value: torch.Tensor) -> torch.Tensor:
    """Values on the e2m1 scale → their codes: the nearest level, ties to the even code, saturating at 6; a
    negative value that rounds to 0 keeps its sign (as compressed-tensors packs it)."""
    magnitude = value.abs()
    # a tie goes to the even code: the boundaries after an even code round down, the others up
    code = (
        (magnitude > 0.25).int()
        + (magnitude >= 0.75).int()
        + (magnitude > 1.25).int()
        + (magnitude >= 1.75).int()
        + (magnitude > 2.5).int()
        + (magnitude >= 3.5).int()
        + (magnitude > 5.0).int()
    )
    return (code | (torch.signbit(value).int() << 3)).to(torch.uint8)


def _budget(exact: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.maximum(scale / 4, exact.abs() / 4)


class MXFP4Experts:
    """gpt-oss: ``X_blocks`` and ``X_scales`` beside each other, X being the fused expert stack."""

    name = "mxfp4"

    def groups(self, tensors: Mapping[str, TensorInfo], quant: Mapping, read: Reader) -> list[Group]:
        out = []
        for name, info in tensors.items():
            if not name.endswith("_blocks") or info.dtype != torch.uint8 or len(info.shape) != 4:
                continue
            stem = name.removesuffix("_blocks")
            scales = tensors.get(stem + "_scales")
            if scales is None or tuple(scales.shape) != tuple(info.shape[:-1]):
                continue
            experts, rows, blocks, width = info.shape
            shape = (experts, blocks * width * 2, rows)  # the model's [E, in, out]
            out.append(Group(stem, shape, {"blocks": name, "scales": stem + "_scales"}))
        return out

    def dequantize(self, group: Group, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        blocks, scales = parts["blocks"], parts["scales"]
        experts, rows, count, _ = blocks.shape
        levels = lut(torch.float32)[unpack(blocks).long()]  # [E, out, G, 32]
        power = torch.exp2(scales.to(torch.float32) - 127.0).unsqueeze(-1)
        value = (levels * power).to(dtype).reshape(experts, rows, count * 32)
        return value.transpose(1, 2).contiguous()

    def _scales(self, value: torch.Tensor) -> torch.Tensor:
        """The power-of-two exponent byte per 32 inputs, for [E, out, G, 32] values."""
        amax = value.abs().amax(dim=-1)
        step = (amax / FP4_MAX).float()
        bits = step.view(torch.int32).to(torch.int64)
        rounded_up = ((bits + 0x7FFFFF) & 0x7F800000) >> 23  # the exponent, rounded up unless a power of two
        return rounded_up.clamp(0, 254).to(torch.uint8)

    def quantize(self, group: Group, weight: torch.Tensor, stored: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
        blocks = stored[group.parts["blocks"]].shape
        value = weight.float().transpose(1, 2).reshape(blocks[0], blocks[1], blocks[2], 32)
        scales = self._scales(value)
        scaled = value * torch.exp2(127.0 - scales.float()).unsqueeze(-1)
        return {"blocks": pack(round_levels(scaled.clamp(-FP4_MAX, FP4_MAX))), "scales": scales}

    def budget(self, group: Group, exact: torch.Tensor) -> torch.Tensor:
        experts, cols, rows = exact.shape
        per_row = exact.transpose(1, 2)  # [E, out, in]
        amax = block_amax(per_row, (1, 32))
        power = torch.exp2(torch.ceil(torch.log2((amax / FP4_MAX).clamp(min=2.0**-126)))) * 2  # slack: one power
        spread = scale_grid(power, rows, cols, (1, 32))
        return _budget(per_row, spread).transpose(1, 2)


class NVFP4Packed:
    """compressed-tensors' nvfp4-pack-quantized."""

    name = "ct_nvfp4"

    def groups(self, tensors: Mapping[str, TensorInfo], quant: Mapping, read: Reader) -> list[Group]:
        out = []
        for name, info in tensors.items():
            module, _, leaf = name.rpartition(".")
            parts = sibling_parts(tensors, name, NVFP4_PARTS, {"input": "input_global_scale"})
            if leaf != "weight_packed" or info.dtype != torch.uint8 or parts is None:
                continue
            rows, half = info.shape
            group_cols = 2 * half // tensors[parts["scale"]].shape[-1]
            out.append(Group(f"{module}.weight", (rows, 2 * half), parts, {"block": (1, group_cols)}))
        return out

    def dequantize(self, group: Group, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        levels = lut(torch.float32)[unpack(parts["codes"]).long()].to(torch.bfloat16)
        scale = parts["scale"].to(torch.bfloat16) / parts["global"]
        rows, cols = group.shape
        value = levels.to(scale.dtype) * scale_grid(scale, rows, cols, group.settings["block"])
        return value.to(torch.bfloat16).to(dtype)

    def quantize(self, group: Group, weight: torch.Tensor, stored: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
        rows, cols = group.shape
        block = group.settings["block"]
        amax = weight.abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)
        global_scale = (E4M3_MAX * FP4_MAX / amax).reshape(1)
        local = block_amax(weight, block) / FP4_MAX
        scale = (global_scale * local).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
        scale = torch.where(scale == 0, torch.tensor(0.125), scale)
        scaled = weight / scale_grid(scale / global_scale, rows, cols, block)
        codes = round_levels(scaled.clamp(-FP4_MAX, FP4_MAX))
        return {
            "codes": pack(codes),
            "scale": scale.to(torch.float8_e4m3fn),
            "global": global_scale.to(stored[group.parts["global"]].dtype),
        }

    def budget(self, group: Group, exact: torch.Tensor) -> torch.Tensor:
        rows, cols = exact.shape
        step = block_amax(exact, group.settings["block"]) / FP4_MAX * (1 + 2.0**-3)  # the e4m3 scale's rounding
        return _budget(exact, scale_grid(step, rows, cols, group.settings["block"])) + exact.abs() * 2.0**-7
