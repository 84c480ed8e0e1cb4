"""Telling that two ranges are the same blocks on disk, from the kernel's extent map."""

from __future__ import annotations

import os

import pytest

from safe_merge.io import extents


def _written(path, size: int) -> int:
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())
    return os.open(path, os.O_RDONLY)


def test_a_range_is_its_own_blocks_and_other_ranges_or_files_are_not(tmp_path):
    fd = _written(tmp_path / "a", 64 * 4096)
    other = _written(tmp_path / "b", 64 * 4096)  # the same size, its own blocks
    try:
        if extents._extents(fd, 0, 4096) is None:
            pytest.skip("this filesystem gives no extent map (FIEMAP)")
        assert extents.same_blocks(fd, 8192, fd, 8192, 40 * 4096)
        assert not extents.same_blocks(fd, 0, fd, 8192, 4 * 4096)
        assert not extents.same_blocks(fd, 0, other, 0, 64 * 4096)
        assert extents.same_blocks(fd, 0, other, 0, 0)
    finally:
        os.close(fd)
        os.close(other)


def test_a_file_with_no_extent_map_is_never_taken_for_the_same_blocks(tmp_path, monkeypatch):
    fd = _written(tmp_path / "a", 8 * 4096)
    monkeypatch.setattr(extents, "_extents", lambda *args: None)
    try:
        assert not extents.same_blocks(fd, 0, fd, 0, 8 * 4096)
    finally:
        os.close(fd)
