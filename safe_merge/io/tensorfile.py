"""The safetensors format's header, read without the library: a little-endian 8-byte length, then JSON naming
each tensor's dtype, shape and byte range. Shared by the adapter reader and the stream backend."""

from __future__ import annotations

import json
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
}
NAME_OF = {dtype: name for name, dtype in DTYPE_NAMES.items()}
FLOATING = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


def read_header(path: Path) -> tuple[dict[str, dict], dict, int]:
    """A safetensors file's tensor entries, its metadata, and where its data starts."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise BadInput("not a safetensors file (shorter than its header length)", path=path)
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2**20:
            raise BadInput(f"not a safetensors file (header length {size})", path=path)
        try:
            header = json.loads(fh.read(size))
        except ValueError as exc:
            raise BadInput(f"not a safetensors file (header is not JSON: {exc})", path=path) from exc
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + size
