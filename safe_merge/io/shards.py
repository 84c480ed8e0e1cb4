"""Write safetensors shards as the tensors arrive.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of every tensor,
plus free-form string metadata), then the tensors' bytes back to back. Every output shape and dtype is known
before any tensor is computed, so the header is written first and each tensor goes straight to disk: nothing is
held back until the shard is complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from safe_merge.errors import BadInput
from safe_merge.io.checkpoint import BLOCK, copy_range, pread_into, tensor_bytes
from safe_merge.io.tensorfile import NAME_OF

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
_UNITS |= {"GIB": 2**30, "TIB": 2**40}
ALIGN = 8  # the header is padded with spaces so that the data starts 8-byte aligned
# the header may be padded further (to BLOCK) so that copied tensors sit at the offsets, modulo a filesystem block,
# they have in the base (ShardWriter), which lets copy_file_range share their whole blocks instead of copying them


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.tensor([], dtype=self.dtype).element_size()


def header_bytes(slots: list[Slot], metadata: dict[str, str] | None = None, data_at: int | None = None) -> bytes:
    """The header for ``slots`` laid out in the given order; ``data_at``: where the tensors' data should start,
    modulo BLOCK (a multiple of ALIGN), reached by padding the header with spaces as the format allows."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for slot in slots:
        header[slot.name] = {
            "dtype": NAME_OF[slot.dtype],
            "shape": list(slot.shape),
            "data_offsets": [offset, offset + slot.nbytes],
        }
        offset += slot.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % ALIGN)
    if data_at is not None and data_at % ALIGN == 0:
        text += b" " * ((data_at - 8 - len(text)) % BLOCK)
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """One output shard: the slots are declared up front and must then be filled in order, each exactly once.
    ``data_at``: where the data starts modulo BLOCK (header_bytes), so that tensors copied from another file sit at
    their offsets there modulo a block (``copies_at``)."""

    def __init__(
        self, path: Path, slots: list[Slot], metadata: dict[str, str] | None = None, data_at: int | None = None
    ):
        self.path = Path(path)
        self.slots = slots
        self._next = 0
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        header = header_bytes(slots, metadata, data_at)
        self._offsets, position = {}, len(header)
        for slot in slots:
            self._offsets[slot.name] = position
            position += slot.nbytes
        try:  # reserve the whole file at once: measured faster than growing it write by write
            os.posix_fallocate(self._fd, 0, len(header) + sum(s.nbytes for s in slots))
        except OSError:
            pass  # filesystems without fallocate grow the file as it is written
        self._write(header)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _expect(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Slot:
        if self._next >= len(self.slots):
            raise RuntimeError(f"{self.path.name}: {name} written after the last declared tensor")
        slot = self.slots[self._next]
        if (slot.name, slot.dtype, slot.shape) != (name, dtype, tuple(shape)):
            raise RuntimeError(
                f"{self.path.name}: got {name} {dtype} {tuple(shape)} where {slot.name} {slot.dtype} "
                f"{slot.shape} was declared"
            )
        self._next += 1
        return slot

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._expect(name, tensor.dtype, tuple(tensor.shape))
        self._write(tensor_bytes(tensor))

    def copy(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], src: Path, offset: int) -> None:
        """Fill the next slot with bytes already stored in another file (an untouched tensor)."""
        slot = self._expect(name, dtype, shape)
        with open(src, "rb") as fh:
            copy_range(fh.fileno(), self._fd, offset, slot.nbytes)

    def read_back(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A tensor already written to this shard, as the file now holds it (into ``out``, a uint8 tensor of its
        byte size, when given)."""
        slot = next(s for s in self.slots[: self._next] if s.name == name)
        data = out if out is not None else torch.empty(slot.nbytes, dtype=torch.uint8)
        done = pread_into(self._fd, memoryview(data.numpy()), self._offsets[name])
        if done != slot.nbytes:
            raise OSError(f"{self.path.name}: {name} reads back short ({done} of {slot.nbytes} bytes)")
        return data.view(slot.dtype).reshape(slot.shape)

    def abort(self) -> None:
        """Close without the completeness check (the caller is leaving on an error; staging is discarded)."""
        os.close(self._fd)

    def close(self) -> None:
        try:
            if self._next != len(self.slots):
                missing = [s.name for s in self.slots[self._next :]]
                raise RuntimeError(f"{self.path.name}: {len(missing)} declared tensors never written ({missing[0]})")
        finally:
            os.close(self._fd)


def copies_at(slots: list[Slot], sources: dict[str, int]) -> int | None:
    """Where a shard's data should start, modulo BLOCK, for the tensors it copies to sit at their source offsets
    modulo a block: ``sources`` maps the copied tensors to their offsets in their files. The start that places the
    most copied bytes so wins; None when the shard copies nothing."""
    placed: dict[int, int] = {}
    position = 0
    for slot in slots:
        if slot.name in sources:
            start = (sources[slot.name] - position) % BLOCK
            placed[start] = placed.get(start, 0) + slot.nbytes
        position += slot.nbytes
    return max(placed, key=lambda start: (placed[start], -start)) if placed else None


INDEX = "model.safetensors.index.json"


def plan_shards(slots: list[Slot], limit: int) -> dict[str, list[Slot]]:
    """Tensors in order into shards of at most ``limit`` bytes (a larger tensor gets a shard of its own), named
    as transformers names them: model.safetensors alone, else model-0000i-of-0000n.safetensors."""
    groups: list[list[Slot]] = [[]]
    size = 0
    for slot in slots:
        if groups[-1] and size + slot.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(slot)
        size += slot.nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def write_index(out: Path, shards: dict[str, list[Slot]]) -> None:
    """The shard index (only when there is more than one shard, as transformers writes it)."""
    if len(shards) < 2:
        return
    weight_map = {slot.name: file_name for file_name, slots in shards.items() for slot in slots}
    total = sum(slot.nbytes for slots in shards.values() for slot in slots)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out) / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def parse_size(text: str) -> int:
    """'5GB' (powers of ten), '500MiB' (powers of two) or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise BadInput(f"--max-shard-size {text!r} is not a size", hint="write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])
