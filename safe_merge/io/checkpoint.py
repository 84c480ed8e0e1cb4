"""A checkpoint on disk, the one reader: every weight file is found through the index, and read one tensor at a
time: safetensors shards by their headers and plain file reads (no memory map, so pages read for one tensor are
not held for the rest of the run), .bin shards through torch's weights-only loader."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from safe_merge.errors import BadInput
from safe_merge.io import memory
from safe_merge.io.extents import same_blocks
from safe_merge.io.tensorfile import DTYPE_NAMES, FLOATING, read_header

WEIGHT_STEMS = ("model.safetensors", "pytorch_model.bin")  # safetensors first, as transformers prefers it


def shard_files(model_dir: Path, *, required: bool = True) -> list[Path]:
    """A model directory's weight files, as its index names them (or the single unsharded file). Without any
    weights: refused when ``required``, else empty. An index naming a shard that is not there is refused."""
    model_dir = Path(model_dir)
    for stem in WEIGHT_STEMS:
        index = model_dir / f"{stem}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            except (ValueError, AttributeError) as exc:
                raise BadInput(f"the index is not a JSON object with a weight_map ({exc})", path=index) from exc
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (model_dir / f).is_file()]
            if missing:
                raise BadInput(f"the index names shards that are not there: {', '.join(missing)}", path=index)
            return [model_dir / f for f in files]
        if (model_dir / stem).is_file():
            return [model_dir / stem]
    if not required:
        return []
    raise BadInput(
        "no model weights (model.safetensors, pytorch_model.bin or their sharded index)",
        path=model_dir,
        hint="name the directory save_pretrained wrote",
    )


def safetensors_headers(model_dir: Path) -> Iterator[dict]:
    """The header of every safetensors shard of a model directory, following its index (nothing for .bin
    checkpoints or a directory without weights: callers fall back to the config, or the loader says what is
    missing)."""
    for shard in shard_files(model_dir, required=False):
        if shard.suffix == ".safetensors":
            yield read_header(shard)[0]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in ``file`` (safetensors); -1 for .bin
    nbytes: int

    @property
    def floating(self) -> bool:
        return self.dtype in FLOATING


class Checkpoint:
    """Every tensor of a model directory, in the order its shards hold them."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.shards = shard_files(self.dir)
        self.format = "bin" if self.shards[0].suffix == ".bin" else "safetensors"
        self.tensors: dict[str, TensorInfo] = {}
        self.order: dict[Path, list[str]] = {}
        self._loaded: tuple[Path, dict] | None = None
        for shard in self.shards:
            self.order[shard] = []
            for info in self._scan(shard):
                self.tensors[info.name] = info
                self.order[shard].append(info.name)

    def _scan(self, shard: Path) -> Iterator[TensorInfo]:
        if shard.suffix == ".bin":
            for name, tensor in self._bin(shard).items():
                yield TensorInfo(
                    name, shard, tensor.dtype, tuple(tensor.shape), -1, tensor.numel() * tensor.element_size()
                )
            return
        header, _, start = read_header(shard)
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, entry in entries:
            if entry.get("dtype") not in DTYPE_NAMES:
                raise BadInput(f"dtype {entry.get('dtype')!r} is not one safe-merge reads", path=shard, key=name)
            begin, end = entry["data_offsets"]
            dtype = DTYPE_NAMES[entry["dtype"]]
            shape = tuple(entry["shape"])  # read_header checked the range against the shape and the file
            yield TensorInfo(name, shard, dtype, shape, start + begin, end - begin)

    def _bin(self, shard: Path) -> dict[str, torch.Tensor]:
        """A .bin shard, memory-mapped where its format allows, read with the weights-only loader only."""
        if self._loaded is None or self._loaded[0] != shard:
            self._loaded = None
            try:
                try:
                    state = torch.load(str(shard), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (pre-zip) format cannot be mapped
                    state = torch.load(str(shard), map_location="cpu", weights_only=True)
            except Exception as exc:
                first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                raise BadInput(
                    f"cannot be read with torch's weights-only loader ({type(exc).__name__}: {first})",
                    path=shard,
                    hint="the file is damaged, or pickles more than tensors; save the model again as safetensors",
                ) from exc
            self._loaded = (shard, state)
        return self._loaded[1]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, in its stored dtype: into ``out`` (of its shape and dtype) when given, else into memory of
        its own."""
        info = self.tensors[name]
        if info.offset < 0:
            value = self._bin(info.file)[name]
            return out.copy_(value) if out is not None else value.clone()
        target = out if out is not None else torch.empty(info.shape, dtype=info.dtype)
        data = target.view(-1).view(torch.uint8) if target.numel() else torch.empty(0, dtype=torch.uint8)
        with open(info.file, "rb") as fh:
            fh.seek(info.offset)
            got = fh.readinto(data.numpy())
        if got != info.nbytes:
            raise BadInput(f"ends early ({got} of {info.nbytes} bytes)", path=info.file, key=name)
        return target

    def same_bytes(self, name: str, other: Checkpoint, other_name: str, chunk: int = 2**24) -> bool:
        """Whether two stored safetensors tensors hold the same bytes, compared a chunk at a time (memory stays at
        two chunks, whatever the tensors' size)."""
        mine, theirs = self.tensors[name], other.tensors[other_name]
        if mine.nbytes != theirs.nbytes or mine.offset < 0 or theirs.offset < 0:
            raise ValueError("same_bytes compares safetensors tensors of one size")
        with open(mine.file, "rb", buffering=0) as left, open(theirs.file, "rb", buffering=0) as right:
            # the whole blocks a filesystem shares between the two files are the same bytes: not read (extents.py)
            head, middle, tail = block_parts(mine.offset, mine.nbytes)
            if (mine.offset - theirs.offset) % BLOCK or not same_blocks(
                left.fileno(), mine.offset + head, right.fileno(), theirs.offset + head, middle
            ):
                return _same_read(left, mine.offset, right, theirs.offset, mine.nbytes, chunk)
            return _same_read(left, mine.offset, right, theirs.offset, head, chunk) and _same_read(
                left, mine.offset + head + middle, right, theirs.offset + head + middle, tail, chunk
            )

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


def _same_read(left, left_at: int, right, right_at: int, nbytes: int, chunk: int) -> bool:
    """Whether two files hold the same ``nbytes`` at those offsets, read a chunk at a time into reused buffers."""
    left_buffer, right_buffer, left_address, right_address = memory.scratch(min(chunk, max(nbytes, 1)))
    done = 0
    while done < nbytes:
        n = min(chunk, nbytes - done)
        if pread_into(left.fileno(), left_buffer[:n], left_at + done) != n:
            return False
        if pread_into(right.fileno(), right_buffer[:n], right_at + done) != n:
            return False
        if not memory.equal_at(left_address, right_address, n):
            return False
        done += n
    return True


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` of the open file ``fd``; how many bytes there were (fewer at its end)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


# a filesystem block: XFS and btrfs share (reflink) a copied range whose source and destination both start and end
# on one
BLOCK = 4096


def block_parts(offset: int, count: int) -> tuple[int, int, int]:
    """``count`` bytes from ``offset`` as (head, whole blocks, tail): up to the next block boundary, the whole
    blocks after it, the rest. The whole blocks are what a filesystem can share between two files."""
    head = min(count, -offset % BLOCK)
    middle = (count - head) // BLOCK * BLOCK
    return head, middle, count - head - middle


def copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes from ``src`` at ``offset`` to ``dst`` at its current position, in the kernel: up to the
    source's next block boundary, then whole blocks, then the rest. Where the destination sits at the same offset
    modulo a block, XFS and btrfs share the whole blocks (reflink: no bytes copied, no space used); elsewhere the
    three calls copy as one would."""
    done = 0
    for part in block_parts(offset, count):
        _copy(src, dst, offset + done, part)
        done += part


def _copy(src: int, dst: int, offset: int, count: int) -> None:
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src, dst, count - done, offset + done)
        except OSError:  # filesystems without copy_file_range (or across devices on old kernels)
            n = os.sendfile(dst, src, offset + done, count - done)
        if n == 0:
            raise OSError(f"short copy: {done} of {count} bytes")
        done += n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in memory order (little-endian on every platform torch supports here)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
