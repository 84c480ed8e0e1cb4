"""compressed-tensors' integer formats: pack-quantized (``weight_packed`` int32 words, ``weight_scale``,
``weight_shape``, a packed ``weight_zero_point`` when asymmetric), int-quantized and naive-quantized (codes as
int8). One scale (and zero point) per tile: the whole weight, a row (channel) or a group of g inputs.

Dequantize as the library does: (q - z) · s in the scale's dtype. Quantize as its min-max observer and
quantizer do: the range widened to include 0, s = max|·| / ((2^b - 1)/2) symmetric or (max - min)/(2^b - 1)
with z = round(q_min - min/s) asymmetric, all in the scale's dtype; q = round(clamp(w/s + z)), half to even.
Rounding costs half a step (s/2) and, asymmetric, half a step more for the rounded zero point; a symmetric
tile's largest value maps to 2^(b-1) - 1/2 and clamps by another half step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from safe_merge.io.checkpoint import TensorInfo
from safe_merge.quant.stored.codec import Group, Reader, block_amax, scale_grid, sibling_parts, tile
from safe_merge.quant.stored.packing import pack_rows, require_bits, unpack_rows
from safe_merge.quant.stored.schemes import scheme_tiles, weight_args

INT_DTYPES = (torch.int8, torch.int16, torch.int32)
OPTIONAL_PARTS = {"zero": "weight_zero_point", "g_idx": "weight_g_idx", "input": "input_scale"}


class IntegerQuantized:
    """pack-quantized, int-quantized and naive-quantized weights."""

    name = "ct_int"

    def groups(self, tensors: Mapping[str, TensorInfo], quant: Mapping, read: Reader) -> list[Group]:
        out = []
        for name, info in tensors.items():
            module, _, leaf = name.rpartition(".")
            packed = leaf == "weight_packed" and info.dtype == torch.int32
            if not packed and not (leaf == "weight" and info.dtype in INT_DTYPES):
                continue
            required = {"codes": leaf, "scale": "weight_scale", **({"shape": "weight_shape"} if packed else {})}
            parts = sibling_parts(tensors, name, required, OPTIONAL_PARTS)
            if parts is None:
                continue
            args = weight_args(quant, f"{module}.weight")
            bits = int(args.get("num_bits") or 8)
            if packed:
                require_bits(bits, f"{module}.weight_packed")
                shape = tuple(int(v) for v in read(parts["shape"]).tolist())
            else:
                shape = tuple(int(v) for v in info.shape)
            settings = {"bits": bits, "packed": packed, "symmetric": bool(args.get("symmetric", True))}
            if "g_idx" in parts:  # act-order: the group of each input column (-1 where unset: the plain groups)
                g_idx = read(parts["g_idx"]).long()
                if bool((g_idx >= 0).all()):
                    settings["g_idx"] = g_idx
            out.append(Group(f"{module}.weight", shape, parts, {**settings, "block": scheme_tiles(quant, name, shape)}))
        return out

    def codes(self, group: Group, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Signed codes [out, in] and zero points per tile (None: symmetric)."""
        bits, cols = group.settings["bits"], group.shape[-1]
        offset = 1 << (bits - 1)
        if group.settings["packed"]:
            q = unpack_rows(parts["codes"], bits, cols) - offset
        else:
            q = parts["codes"].to(torch.int32)
        zero = parts.get("zero")
        if zero is not None and group.settings["packed"]:
            tiles = parts["scale"].shape[0]
            zero = unpack_rows(zero.T, bits, tiles).T - offset
        return q, zero

    def dequantize(self, group: Group, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q, zero = self.codes(group, parts)
        scale = parts["scale"].reshape(1, 1) if parts["scale"].dim() < 2 else parts["scale"]
        spread = _spread(scale, group)
        zeros = _spread(zero, group) if zero is not None else None
        value = q.to(scale.dtype)
        if zeros is not None:
            value = value - zeros.to(scale.dtype)
        return (value * spread).to(dtype)

    def quantize(self, group: Group, weight: torch.Tensor, stored: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
        bits = group.settings["bits"]
        kept = stored[group.parts["scale"]]
        value = weight.to(kept.dtype)
        q_min, q_max = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        steps = torch.tensor(float(q_max - q_min), dtype=kept.dtype)
        low, high = _ranges(value, group)
        if group.settings["symmetric"]:
            scale = torch.maximum(low.abs(), high.abs()) / (steps / 2)
            zero = None
        else:
            scale = (high - low) / steps
            zero = torch.clamp(q_min - low / scale, q_min, q_max)
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(kept.dtype).eps, dtype=kept.dtype), scale)
        if zero is not None:
            zero = torch.round(zero.clamp(-128, 127)).to(torch.int8)
        scaled = value / _spread(scale, group)
        if zero is not None:
            scaled += _spread(zero, group).to(kept.dtype)
        q = torch.round(torch.clamp(scaled, q_min, q_max)).to(torch.int32)
        offset = 1 << (bits - 1)
        out = {"scale": scale.reshape(kept.shape)}
        codes = stored[group.parts["codes"]]
        out["codes"] = pack_rows(q + offset, bits, codes.shape[-1]) if group.settings["packed"] else q.to(codes.dtype)
        if zero is not None and "zero" in group.parts:
            zeros = stored[group.parts["zero"]]
            if group.settings["packed"]:
                out["zero"] = pack_rows(zero.to(torch.int32).T + offset, bits, zeros.shape[0]).T.contiguous()
            else:
                out["zero"] = zero.to(zeros.dtype).reshape(zeros.shape)
        return out

    def budget(self, group: Group, exact: torch.Tensor) -> torch.Tensor:
        bits = group.settings["bits"]
        steps = (1 << bits) - 1
        low, high = _ranges(exact, group)
        if group.settings["symmetric"]:
            step, halves = torch.maximum(low.abs(), high.abs()) / (steps / 2), 0.5
        else:
            step, halves = (high - low) / steps, 1.0
        # the division and the scale are rounded to the scale's dtype first (2^-8 of up to 2^(b-1) steps)
        slack = halves + (1 << bits) * 2.0**-8
        return _spread(step * slack, group) + exact.abs() * 2.0**-8


def _ranges(value: torch.Tensor, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per tile (per row and act-order group), widened to include 0."""
    g_idx = group.settings.get("g_idx")
    if g_idx is not None:
        count = int(g_idx.max()) + 1
        index = g_idx.expand_as(value)
        start = torch.zeros(value.shape[0], count, dtype=value.dtype)
        return start.scatter_reduce(1, index, value, "amin"), start.scatter_reduce(1, index, value, "amax")
    block = tile(group)
    return -block_amax(value.clamp(max=0), block), block_amax(value.clamp(min=0), block)


def _spread(per_tile: torch.Tensor, group: Group) -> torch.Tensor:
    """Values per tile (or act-order group) spread over the weight's elements."""
    g_idx = group.settings.get("g_idx")
    if g_idx is not None:
        return per_tile[:, g_idx]
    rows, cols = group.shape[-2:]
    return scale_grid(per_tile, rows, cols, tile(group))
