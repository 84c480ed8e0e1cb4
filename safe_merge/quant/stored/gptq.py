"""GPTQ and AWQ 4-bit (and 2-/8-bit GPTQ) linears as gptqmodel and AutoAWQ store them: ``qweight`` (int32 words of
codes), ``qzeros`` (zero points, packed likewise), ``scales`` (float16, one per group of inputs and output)
and, for GPTQ, ``g_idx`` (the group of each input column: act-order checkpoints permute them).

GPTQ packs codes along the inputs ([in·b/32, out]) and zero points along the outputs ([G, out·b/32]); its v1
format (``checkpoint_format`` "gptq") stores every zero point minus one, as one subtraction on the packed
word (with borrows where a zero is 0), which is undone as one addition, the way gptqmodel converts v1 on load.
AWQ packs both along the outputs, each word holding columns 0 2 4 6 1 3 5 7 of its eight. Dequantize as the
libraries do: scales[g] · (q - z[g]) with the code difference an exact small integer and the product rounded once
to float16, transposed to the model's [out, in].

Quantize per group, in float32 with the float16 scale: GPTQ's min-max parameters (the range widened to include
0; symmetric: ±max|·| and z = 2^(b-1); else z = round(-min/s)), AWQ's (s = max(max - min, 1e-5)/15, z =
clamp(-round(min/s), 0, 15)); q = clamp(round(w/s + z), 0, 2^b - 1). AutoAWQ does not clamp the codes (its
input is already on the grid); safe-merge does, since a merged weight is not. The rounding is at most half a
step, plus half a step more for the rounded zero point and the scale's float16 rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from safe_merge.errors import BadInput
from safe_merge.io.checkpoint import TensorInfo
from safe_merge.quant.stored.codec import Group, Reader, sibling_parts
from safe_merge.quant.stored.packing import pack_rows, require_bits, unpack_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column each successive nibble of an AWQ word holds, within its eight
AWQ_MIN_RANGE = 1e-5
PACKED_PARTS = {"codes": "qweight", "zero": "qzeros", "scale": "scales"}  # role → the name after the module's


def _ones(bits: int) -> int:
    """The packed word whose every field is 1 (v1 stores zero points minus this)."""
    return sum(1 << (i * bits) for i in range(32 // bits))


def _groups_of(group: Group, g_idx: torch.Tensor | None) -> torch.Tensor:
    cols = group.shape[1]
    if g_idx is not None:
        return g_idx.long()
    size = group.settings["group_size"]
    return torch.arange(cols) // (size if size > 0 else cols)


def _dequantize(q, zero, scales, groups, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """[in, out] codes, [G, out] zero points and scales → the [out, in] weight (codes as int8, int16 for 8 bits,
    as gptqmodel holds them)."""
    small = torch.int16 if bits > 7 else torch.int8
    value = scales[groups] * (q.to(small) - zero.to(small)[groups])
    return value.t().contiguous().to(dtype)


class _Packed:
    """What GPTQ and AWQ share: the groups, the per-group parameters, the budget."""

    name = ""
    method = ""

    def groups(self, tensors: Mapping[str, TensorInfo], quant: Mapping, read: Reader) -> list[Group]:
        bits, size = int(quant.get("bits") or 4), int(quant.get("group_size") or -1)
        out = []
        for name, info in tensors.items():
            module, _, leaf = name.rpartition(".")
            parts = sibling_parts(tensors, name, PACKED_PARTS, {"g_idx": "g_idx"})
            if leaf != "qweight" or info.dtype != torch.int32 or parts is None:
                continue
            require_bits(bits, name)
            self.check(quant, name)
            settings = self.settings(quant, bits, size)
            if "g_idx" in parts:  # the group of each input, kept as stored when requantizing
                settings["g_idx"] = read(parts["g_idx"]).long()
            out.append(Group(f"{module}.weight", self.shape(tensors, parts, bits), parts, settings))
        return out

    def check(self, quant: Mapping, name: str) -> None:
        """Refuse what this codec does not read (BadInput names the key)."""

    def settings(self, quant: Mapping, bits: int, size: int) -> dict:
        return {"bits": bits, "group_size": size, "symmetric": bool(quant.get("sym", False))}

    def params(self, group: Group, weight: torch.Tensor, groups: torch.Tensor, count: int):
        """(scales [G, out] float16, zero points [G, out]) for a float32 weight [out, in]."""
        raise NotImplementedError

    def budget(self, group: Group, exact: torch.Tensor) -> torch.Tensor:
        groups = _groups_of(group, group.settings.get("g_idx"))
        count = int(groups.max()) + 1
        scales, _ = self.params(group, exact.float(), groups, count)
        step = scales.double().t()[:, groups]  # [out, in]: half a step, and half for the rounded zero point
        return step * (1.0 + 2.0**-10) + exact.abs() * 2.0**-10


class GPTQ(_Packed):
    name = "gptq"

    def settings(self, quant: Mapping, bits: int, size: int) -> dict:
        kind = str(quant.get("checkpoint_format") or quant.get("format") or "gptq")
        return {**super().settings(quant, bits, size), "v1": kind == "gptq"}

    def check(self, quant: Mapping, name: str) -> None:
        kind = str(quant.get("checkpoint_format") or quant.get("format") or "gptq")
        if kind not in ("gptq", "gptq_v2"):
            raise BadInput(
                f"GPTQ checkpoint_format {kind!r} is not read by safe-merge (it reads gptq, gptq_v2)",
                key="quantization_config.checkpoint_format",
                hint="merge into the unquantized base, then quantize the merged model",
            )

    @staticmethod
    def shape(tensors, parts, bits) -> tuple[int, int]:
        out = int(tensors[parts["scale"]].shape[1])
        cols = (
            int(tensors[parts["g_idx"]].shape[0])
            if "g_idx" in parts
            else int(tensors[parts["codes"]].shape[0]) * 32 // bits
        )
        return (out, cols)

    def _zeros(self, group: Group, packed: torch.Tensor) -> torch.Tensor:
        bits = group.settings["bits"]
        if group.settings["v1"]:
            packed = ((packed.to(torch.int64) + _ones(bits)) & 0xFFFFFFFF).to(torch.int64)
            packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
        return unpack_rows(packed, bits, group.shape[0])

    def dequantize(self, group: Group, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        bits, cols = group.settings["bits"], group.shape[1]
        q = unpack_rows(parts["codes"].t(), bits, cols).t()  # [in, out]
        zero = self._zeros(group, parts["zero"])
        return _dequantize(q, zero, parts["scale"], _groups_of(group, group.settings.get("g_idx")), bits, dtype)

    def params(self, group: Group, weight: torch.Tensor, groups: torch.Tensor, count: int):
        bits = group.settings["bits"]
        top = (1 << bits) - 1
        index = groups.expand_as(weight)
        low = torch.zeros(weight.shape[0], count).scatter_reduce(1, index, weight, "amin")  # widened to 0
        high = torch.zeros(weight.shape[0], count).scatter_reduce(1, index, weight, "amax")
        if group.settings["symmetric"]:
            high = torch.maximum(low.abs(), high)
            low = torch.where(low < 0, -high, low)
            empty = high == 0
        else:
            empty = (low == 0) & (high == 0)
        low, high = torch.where(empty, low - 1, low), torch.where(empty, high + 1, high)
        scales = (high - low) / top
        zero = (
            torch.full_like(scales, float((top + 1) // 2))
            if group.settings["symmetric"]
            else torch.round(-low / scales)
        )
        return scales.t().contiguous(), zero.t().contiguous()

    def quantize(self, group: Group, weight: torch.Tensor, stored: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
        bits = group.settings["bits"]
        groups = _groups_of(group, group.settings.get("g_idx"))
        count = int(stored[group.parts["scale"]].shape[0])
        value = weight.float()
        scales, zero = self.params(group, value, groups, count)
        step = scales.to(torch.float16).float()[groups].t()  # the codes agree with the scales as stored
        q = torch.round((value + zero[groups].t() * step) / step).clamp_(0, (1 << bits) - 1).to(torch.int32)
        zero = zero.to(torch.int32).clamp(0, (1 << bits) - 1)
        packed_zero = pack_rows(zero, bits, stored[group.parts["zero"]].shape[1])
        if group.settings["v1"]:
            word = (packed_zero.to(torch.int64) - _ones(bits)) & 0xFFFFFFFF
            packed_zero = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
        codes = pack_rows(q, bits, stored[group.parts["codes"]].shape[0]).t().contiguous()
        return {"codes": codes, "zero": packed_zero, "scale": scales.to(stored[group.parts["scale"]].dtype)}


class AWQ(_Packed):
    name = "awq"

    def check(self, quant: Mapping, name: str) -> None:
        version = str(quant.get("version") or quant.get("format") or "gemm").lower()
        if version != "gemm" or quant.get("zero_point") is False:
            raise BadInput(f"AWQ version {version!r} (zero_point {quant.get('zero_point')}) is not read by safe-merge "
                           "(it reads gemm with zero points)", key="quantization_config.version",
                           hint="use the unquantized base")  # fmt: skip

    @staticmethod
    def shape(tensors, parts, bits) -> tuple[int, int]:
        return (int(tensors[parts["scale"]].shape[1]), int(tensors[parts["codes"]].shape[0]))

    def dequantize(self, group: Group, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        bits, (rows, _) = group.settings["bits"], group.shape
        q = unpack_rows(parts["codes"], bits, rows, AWQ_ORDER)  # [in, out]
        zero = unpack_rows(parts["zero"], bits, rows, AWQ_ORDER)
        return _dequantize(q, zero, parts["scale"], _groups_of(group, None), bits, dtype)

    def params(self, group: Group, weight: torch.Tensor, groups: torch.Tensor, count: int):
        top = (1 << group.settings["bits"]) - 1
        index = groups.expand_as(weight)
        value = weight.to(torch.float16)  # AutoAWQ works on the float16 layer
        start = torch.zeros(weight.shape[0], count, dtype=torch.float16)
        high = start.scatter_reduce(1, index, value, "amax", include_self=False)
        low = start.scatter_reduce(1, index, value, "amin", include_self=False)
        scales = (high - low).clamp(min=AWQ_MIN_RANGE) / top
        zero = (-torch.round(low / scales)).clamp(0, top)
        return scales.t().contiguous(), zero.t().contiguous()

    def quantize(self, group: Group, weight: torch.Tensor, stored: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
        bits = group.settings["bits"]
        groups = _groups_of(group, None)
        scales, zero = self.params(group, weight.float(), groups, int(stored[group.parts["scale"]].shape[0]))
        step = scales[groups].t()
        q = torch.round((weight.to(torch.float16) + zero[groups].t() * step) / step).clamp_(0, (1 << bits) - 1)
        codes = q.t().to(torch.int32)  # [in, out]
        words = stored[group.parts["codes"]].shape[1]
        return {
            "codes": pack_rows(codes, bits, words, AWQ_ORDER),
            "zero": pack_rows(zero.to(torch.int32), bits, words, AWQ_ORDER),
            "scale": scales.to(stored[group.parts["scale"]].dtype),
        }
