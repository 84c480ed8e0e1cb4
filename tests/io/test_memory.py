"""Comparing memory through memcmp, and without it."""

from __future__ import annotations

import numpy as np
import pytest

from safe_merge.io import memory


@pytest.mark.parametrize("with_memcmp", [True, False], ids=["memcmp", "numpy"])
def test_equal_at_finds_one_differing_byte_anywhere(monkeypatch, with_memcmp):
    if not with_memcmp:
        monkeypatch.setattr(memory, "_MEMCMP", None)
    a = np.random.default_rng(0).integers(0, 256, 10_001, dtype=np.uint8)
    b = a.copy()
    assert memory.equal_at(a.ctypes.data, b.ctypes.data, a.size)
    for at in (0, 5_000, 10_000):
        c = a.copy()
        c[at] ^= 1
        assert not memory.equal_at(a.ctypes.data, c.ctypes.data, a.size)
    assert memory.equal_at(a.ctypes.data, b.ctypes.data, 0)


def test_scratch_buffers_are_reused_and_grow_when_asked_for_more():
    left, right, at_left, at_right = memory.scratch(100)
    assert len(left) >= 100 and len(right) >= 100 and at_left != at_right
    assert memory.scratch(50)[2] == at_left  # the same memory, faulted in once
    assert len(memory.scratch(10**6)[0]) >= 10**6
