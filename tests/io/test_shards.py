"""The shard writer's layout: a header padded so that copied tensors keep their offsets modulo a block."""

from __future__ import annotations

import torch
from safetensors import safe_open

from safe_merge.io.checkpoint import BLOCK, Checkpoint
from safe_merge.io.shards import ShardWriter, Slot, copies_at, header_bytes

SLOTS = [Slot("a", torch.bfloat16, (3, 5)), Slot("b", torch.float32, (1000,)), Slot("c", torch.bfloat16, (7,))]


def test_the_header_is_padded_to_start_the_data_where_asked_and_stays_readable(tmp_path):
    for data_at in (0, 8, 1000, BLOCK - 8):
        header = header_bytes(SLOTS, {"format": "pt"}, data_at)
        assert len(header) % BLOCK == data_at and header[8:9] == b"{"
        path = tmp_path / "model.safetensors"
        writer = ShardWriter(path, SLOTS, {"format": "pt"}, data_at)
        values = {s.name: torch.arange(s.nbytes // s.dtype.itemsize).to(s.dtype).reshape(s.shape) for s in SLOTS}
        for name, value in values.items():
            writer.write(name, value)
        writer.close()
        with safe_open(str(path), framework="pt") as fh:  # the safetensors library reads the padded header
            assert all(torch.equal(fh.get_tensor(n), v) for n, v in values.items())
        assert Checkpoint(tmp_path).tensors["a"].offset % BLOCK == data_at
        path.unlink()


def test_an_offset_the_format_cannot_align_to_is_ignored():
    assert len(header_bytes(SLOTS, None, 1001)) % 8 == 0  # data stays 8-byte aligned


def test_copies_at_places_the_most_copied_bytes_at_their_source_offsets():
    # "b" (4000 bytes) starts 30 bytes into the data; copied from offset 5000 of its file, the data must start at
    # 4970 modulo a block; "c" (14 bytes) would want another start and loses
    assert copies_at(SLOTS, {"b": 5000, "c": 4100}) == (5000 - 30) % BLOCK
    assert copies_at(SLOTS, {}) is None
