"""Safetensors headers are checked before anything is allocated from them, as strictly as the library checks them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from safe_merge.errors import BadInput
from safe_merge.io.tensorfile import read_header


def _write(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _two(a: list[int], b: list[int], data: int = 32, dtype: str = "F32", shape_a=(4,), shape_b=(4,)) -> dict:
    return {
        "a": {"dtype": dtype, "shape": list(shape_a), "data_offsets": a},
        "b": {"dtype": dtype, "shape": list(shape_b), "data_offsets": b},
    }


DAMAGED = {
    "overlapping ranges": (_two([0, 16], [8, 24]), 24, "overlaps"),
    "a gap between tensors": (_two([0, 16], [20, 36]), 36, "gap"),
    "a range that does not fit the shape": (_two([0, 16], [16, 24]), 24, "needs 16"),
    "a 2 GB tensor stored in 0 bytes": (
        {"big": {"dtype": "F32", "shape": [2**29], "data_offsets": [0, 2**31]}},
        0,
        "truncated",
    ),
    "trailing bytes no tensor claims": (_two([0, 16], [16, 32]), 40, "the file holds 40"),
    "an unknown dtype": (_two([0, 16], [16, 32], dtype="F33"), 32, "not a safetensors dtype"),
    "a negative size": (_two([0, 16], [16, 32], shape_a=(-4,)), 32, "not a list of sizes"),
    "a backwards range": (_two([16, 0], [16, 32]), 32, "not a byte range"),
}


@pytest.mark.parametrize("case", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_header_is_refused_naming_the_file_and_key_and_the_library_refuses_it_too(tmp_path, case):
    header, size, needle = DAMAGED[case]
    path = _write(tmp_path / "x.safetensors", header, bytes(size))
    with pytest.raises(BadInput) as caught:
        read_header(path)
    assert needle in str(caught.value) and str(path) in str(caught.value)
    assert "save or download it again" in str(caught.value)
    with pytest.raises(Exception):  # noqa: B017 - the library raises its own error type
        safetensors.safe_open(str(path), "pt")


def test_header_length_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(BadInput, match="header length 1000000"):
        read_header(path)


def test_metadata_must_map_strings_to_strings(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"__metadata__": {"format": 3}}, b"")
    with pytest.raises(BadInput, match="__metadata__"):
        read_header(path)


def test_files_the_library_writes_pass(tmp_path):
    tensors = {
        "w": torch.randn(3, 5),
        "empty": torch.zeros(0, 4),
        "h": torch.ones(7, dtype=torch.float16),
        "i": torch.arange(3),
    }
    save_file(tensors, str(tmp_path / "ok.safetensors"), metadata={"format": "pt"})
    header, metadata, start = read_header(tmp_path / "ok.safetensors")
    assert set(header) == set(tensors) and metadata == {"format": "pt"} and start > 8
