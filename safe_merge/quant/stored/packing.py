"""Integer codes packed into int32 words, least significant bits first: element k of a row sits in word
k·b // 32 at bit k·b % 32 (for b dividing 32, the layout compressed-tensors, GPTQ and AWQ share). Codes are
stored unsigned; ``offset`` is what was added to signed codes before packing."""

from __future__ import annotations

import torch

from safe_merge.errors import BadInput

PACKED_BITS = (2, 4, 8)


def require_bits(bits: int, where: str) -> None:
    if bits not in PACKED_BITS:
        raise BadInput(
            f"{bits}-bit codes packed into int32 are not read by safe-merge (it reads {PACKED_BITS})",
            key=where,
            hint="merge into the unquantized base, then quantize the merged model",
        )


def unpack_rows(packed: torch.Tensor, bits: int, count: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[..., words] int32 → [..., count] int32 codes (unsigned). ``order``: the position within a word each
    successive field holds (AWQ interleaves them)."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        fields = fields[..., torch.argsort(torch.tensor(order))]
    return fields.flatten(-2)[..., :count].to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int, words: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[..., n] unsigned codes → [..., words] int32, the inverse of unpack_rows."""
    per = 32 // bits
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, words * per - codes.shape[-1]))
    fields = padded.reshape(*codes.shape[:-1], words, per)
    if order is not None:
        fields = fields[..., torch.tensor(order)]
    shifts = torch.arange(per, dtype=torch.int64) * bits
    value = (fields << shifts).sum(dim=-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)
