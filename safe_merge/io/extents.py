"""Whether two byte ranges are the same blocks on disk: a range a filesystem shares (XFS and btrfs reflinks,
made by copy_file_range, io/checkpoint.py) holds the same bytes in both files by construction, so the check that
a copied tensor equals the base's need not read it back (on a 600 GB merge, reading both sides is most of the
work once the copies themselves cost nothing).

The kernel's FIEMAP lists the extents behind a file's logical range; two ranges are the same blocks when, block
for block, they map to the same physical address in extents with nothing pending or transformed (no delayed
allocation, no unwritten preallocation, no inline, encoded or encrypted data). Anything else, or a system without
FIEMAP, answers False and the caller compares the bytes.
"""

from __future__ import annotations

import struct

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQ2QI3I")  # fe_logical, fe_physical, fe_length, reserved, fe_flags, reserved
# last (0x1) and shared (0x2000) are fine; every other flag leaves the physical address short of the bytes
_PLAIN = 0x1 | 0x2000
_BATCH = 256


def _extents(fd: int, start: int, length: int) -> list[tuple[int, int, int, int]] | None:
    """(logical, physical, length, flags) of the extents behind [start, start + length), or None."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    out: list[tuple[int, int, int, int]] = []
    position, end = start, start + length
    while position < end:
        reply = bytearray(_HEAD.pack(position, end - position, FIEMAP_FLAG_SYNC, 0, _BATCH, 0))
        reply += bytes(_EXTENT.size * _BATCH)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, reply)
        except OSError:
            return None
        mapped = _HEAD.unpack_from(reply)[3]
        if not mapped:
            return None  # a hole
        for i in range(mapped):
            logical, physical, size, _, _, flags, *_ = _EXTENT.unpack_from(reply, _HEAD.size + i * _EXTENT.size)
            out.append((logical, physical, size, flags))
        if out[-1][0] + out[-1][2] <= position:
            return None  # no progress: an extent map this reading does not follow
        position = out[-1][0] + out[-1][2]
        if out[-1][3] & 0x1:  # the file's last extent
            break
    return out


def _physical(extents: list[tuple[int, int, int, int]], position: int) -> tuple[int, int] | None:
    """(physical address of ``position``, bytes to the end of its extent), for a plain extent covering it."""
    for logical, physical, size, flags in extents:
        if logical <= position < logical + size:
            return (physical + position - logical, logical + size - position) if not flags & ~_PLAIN else None
    return None


def same_blocks(left_fd: int, left_at: int, right_fd: int, right_at: int, length: int) -> bool:
    """Whether [left_at, +length) of one file and [right_at, +length) of another are the same blocks on disk."""
    if length <= 0:
        return length == 0
    left, right = _extents(left_fd, left_at, length), _extents(right_fd, right_at, length)
    if left is None or right is None:
        return False
    done = 0
    while done < length:
        a, b = _physical(left, left_at + done), _physical(right, right_at + done)
        if a is None or b is None or a[0] != b[0]:
            return False
        done += min(a[1], b[1], length - done)
    return True
