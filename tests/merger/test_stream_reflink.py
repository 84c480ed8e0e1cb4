"""Untouched tensors copied so that a filesystem that shares blocks (XFS, btrfs) shares theirs with the base."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from safe_merge.io import checkpoint as checkpoint_module
from safe_merge.io.checkpoint import BLOCK, Checkpoint
from tests.quant.stored import checkpoints
from tests.release import requires_release

pytestmark = requires_release("stream_backend_matches")

# a directory on a filesystem that shares copied blocks (e.g. an XFS loop mount made with reflink=1); without it
# the sharing itself is not tested here, the layout that allows it is
REFLINK_DIR = os.environ.get("SAFE_MERGE_REFLINK_DIR")


def _untouched(out: Path, base: Path) -> dict[str, tuple[int, int, int]]:
    """(offset in the output, offset in the base, bytes) of every tensor the merge left as the base has it."""
    written, source = Checkpoint(out), Checkpoint(base)
    return {
        name: (info.offset, source.tensors[name].offset, info.nbytes)
        for name, info in written.tensors.items()
        if written.same_bytes(name, source, name)
    }


def _with_its_own_metadata(base: Path) -> Path:
    """The base's weights saved again with metadata of another writer: its header is longer than the one the
    merge writes, so its tensors start elsewhere modulo a block unless the merged header is padded to match."""
    path = base / "model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt", "written_by": "another tool, 1.0"})
    return base


def test_untouched_tensors_keep_their_base_offsets_modulo_a_block(tmp_path, cli):
    base = _with_its_own_metadata(checkpoints.float_model(tmp_path))
    adapter = checkpoints.adapter_for(base, tmp_path)
    code, _, err = cli("merge", base, adapter, "-o", tmp_path / "out", "--backend", "stream")
    assert code == 0, err
    untouched = _untouched(tmp_path / "out", base)
    assert len(untouched) > 10
    assert all((mine - theirs) % BLOCK == 0 for mine, theirs, _ in untouched.values())


FS_IOC_FIEMAP = 0xC020660B
EXTENT = struct.Struct("=QQQ2QI3I")  # fiemap_extent: logical, physical, length, reserved, flags, reserved
EXTENT_SHARED = 0x2000


def _shared_bytes(path: Path) -> int:
    """Bytes of ``path`` in extents the filesystem marks shared (FIEMAP)."""
    count = 512
    reply = bytearray(struct.pack("=QQIIII", 0, 2**64 - 1, 1, 0, count, 0) + b"\0" * (EXTENT.size * count))
    with open(path, "rb") as fh:  # flags 1: FIEMAP_FLAG_SYNC; the reply is written into the buffer
        fcntl.ioctl(fh.fileno(), FS_IOC_FIEMAP, reply)
    mapped = struct.unpack_from("=QQIIII", reply)[3]
    extents = [EXTENT.unpack_from(reply, 32 + i * EXTENT.size) for i in range(mapped)]
    return sum(e[2] for e in extents if e[-4] & EXTENT_SHARED)


@pytest.mark.skipif(REFLINK_DIR is None, reason="SAFE_MERGE_REFLINK_DIR names no filesystem that shares blocks")
def test_untouched_tensors_share_their_whole_blocks_with_the_base(cli):
    root = Path(REFLINK_DIR) / f"reflink-test-{os.getpid()}"
    root.mkdir()
    base = _with_its_own_metadata(checkpoints.float_model(root, intermediate=1024))  # gate/up untouched: 128 KiB
    adapter = checkpoints.adapter_for(base, root)
    code, _, err = cli("merge", base, adapter, "-o", root / "out", "--backend", "stream")
    assert code == 0, err
    untouched = _untouched(root / "out", base)
    whole = sum(max(0, (n - (-theirs % BLOCK)) // BLOCK * BLOCK) for _, theirs, n in untouched.values())
    shared = _shared_bytes(root / "out" / "model.safetensors")
    assert whole > 2**18 and shared >= whole, (shared, whole)
    # and the check that a copied tensor is the base's reads only what is not shared: its head and tail
    read = []
    real = checkpoint_module.pread_into

    def counted(fd: int, view: memoryview, at: int) -> int:
        read.append(len(view))
        return real(fd, view, at)

    written, source = Checkpoint(root / "out"), Checkpoint(base)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_module, "pread_into", counted)
        assert all(written.same_bytes(name, source, name) for name in untouched)
    assert sum(read) <= 2 * 2 * BLOCK * len(untouched) < whole
