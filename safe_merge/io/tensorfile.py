"""The safetensors format's header, read without the library: a little-endian 8-byte length, then JSON naming
each tensor's dtype, shape and byte range. Shared by the adapter reader and the stream backend."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from safe_merge.errors import BadInput

# safetensors' dtype names; the format's own specification lists them
DTYPE_NAMES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    **({"F8_E8M0": torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else {}),  # power-of-two scales
}
NAME_OF = {dtype: name for name, dtype in DTYPE_NAMES.items()}
FLOATING = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


# every dtype the safetensors format defines, with its size in bits (sub-byte types pack several per byte)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}  # fmt: skip
HEADER_LIMIT = 100 * 2**20  # the safetensors library refuses larger headers too
DAMAGED = "the file is damaged or was not written by a safetensors writer: save or download it again"


def read_header(path: Path) -> tuple[dict[str, dict], dict, int]:
    """A safetensors file's tensor entries, its metadata, and where its data starts; checked as strictly as the
    safetensors library does before anything is allocated from what the header claims."""
    with open(path, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) != 8:
            raise BadInput("not a safetensors file (shorter than its header length)", path=path, hint=DAMAGED)
        (size,) = struct.unpack("<Q", raw)
        if size > HEADER_LIMIT or 8 + size > file_size:
            raise BadInput(
                f"not a safetensors file (header length {size}, file size {file_size})", path=path, hint=DAMAGED
            )
        try:
            header = json.loads(fh.read(size))
        except ValueError as exc:
            raise BadInput(f"not a safetensors file (header is not JSON: {exc})", path=path, hint=DAMAGED) from exc
    if not isinstance(header, dict):
        raise BadInput("not a safetensors file (header is not a JSON object)", path=path, hint=DAMAGED)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInput("the header's __metadata__ is not a map of strings", path=path, hint=DAMAGED)
    check_layout(header, file_size - 8 - size, path)
    return header, metadata, 8 + size


def check_layout(header: dict, data_size: int, path: Path) -> None:
    """Every entry well formed, its byte range exactly its shape's size, the ranges back to back from 0 and ending
    at the end of the file: no overlap, no gap, nothing claimed that the file does not hold."""
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise BadInput("the header entry is not an object", path=path, key=key, hint=DAMAGED)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise BadInput(f"dtype {dtype!r} is not a safetensors dtype", path=path, key=key, hint=DAMAGED)
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise BadInput(f"shape {shape!r} is not a list of sizes", path=path, key=key, hint=DAMAGED)
        if (
            not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets))
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise BadInput(f"data_offsets {offsets!r} is not a byte range", path=path, key=key, hint=DAMAGED)
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise BadInput(
                f"the byte range {offsets} holds {offsets[1] - offsets[0]} bytes; shape {shape} of {dtype} needs "
                f"{bits / 8:g}",
                path=path,
                key=key,
                hint=DAMAGED,
            )
        spans.append((offsets[0], offsets[1], key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise BadInput(f"the byte range [{begin}, {end}) {what}", path=path, key=key, hint=DAMAGED)
        position = end
    if position != data_size:
        raise BadInput(
            f"the tensors cover {position} bytes of data; the file holds {data_size}"
            + (" (truncated?)" if position > data_size else ""),
            path=path,
            hint=DAMAGED,
        )
