"""The one checkpoint reader: weight files are found through the index, never by globbing the directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from safe_merge.errors import BadInput
from safe_merge.io import loading
from safe_merge.io.checkpoint import Checkpoint, shard_files


def _sharded(directory):
    """Two shards and their index, plus a stray safetensors file the index does not name."""
    directory.mkdir()
    save_file({"a.weight": torch.ones(2, 3, dtype=torch.bfloat16)}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.ones(4, dtype=torch.bfloat16)}, str(directory / "model-00002-of-00002.safetensors"))
    stray = {f"stray{i}.weight": torch.ones(10, 10) for i in range(3)}  # float32, more tensors than the model has
    save_file(stray, str(directory / "old-copy.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def test_stored_shapes_dtype_and_size_follow_the_index_and_ignore_stray_files(tmp_path):
    model_dir = _sharded(tmp_path / "model")
    assert loading.stored_shapes(model_dir) == {"a.weight": (2, 3), "b.weight": (4,)}
    assert loading.stored_dtype(model_dir) is torch.bfloat16  # counting the stray file would say float32
    assert loading.floating_numel(model_dir) == 10  # not 310
    assert loading.stored_tensor(model_dir, "stray0.weight") is None
    assert set(Checkpoint(model_dir).tensors) == {"a.weight", "b.weight"}


def test_an_index_naming_a_missing_shard_is_refused_naming_the_index(tmp_path):
    model_dir = _sharded(tmp_path / "model")
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BadInput, match="model-00002-of-00002.safetensors") as raised:
        loading.stored_shapes(model_dir)
    assert "model.safetensors.index.json" in str(raised.value)


def test_a_directory_without_weights_has_no_shards_unless_they_are_required(tmp_path):
    assert shard_files(tmp_path, required=False) == []
    assert loading.stored_shapes(tmp_path) == {}
    with pytest.raises(BadInput, match="no model weights"):
        shard_files(tmp_path)


def test_same_bytes_compares_two_files_chunk_by_chunk_to_the_last_byte(tmp_path):
    value = torch.arange(1000, dtype=torch.float32)
    (tmp_path / "a").mkdir()
    save_file({"first": torch.zeros(3), "w": value}, str(tmp_path / "a" / "model.safetensors"))
    for at, label in ((None, "same"), (0, "first"), (500, "middle"), (999, "last")):
        changed = value.clone()
        if at is not None:
            changed.view(torch.int32)[at] ^= 1
        other = tmp_path / label
        other.mkdir()
        save_file({"w": changed}, str(other / "model.safetensors"), metadata={"moved": "the data elsewhere"})
        same = Checkpoint(tmp_path / "a").same_bytes("w", Checkpoint(other), "w", chunk=128)
        assert same is (at is None), label


def test_same_bytes_reads_whole_blocks_that_are_not_shared_and_finds_a_change_there(tmp_path):
    value = torch.arange(50_000, dtype=torch.float32)  # 200 kB: whole blocks between a head and a tail
    changed = value.clone()
    changed.view(torch.int32)[25_000] ^= 1
    for label, tensor in (("a", value), ("b", value), ("c", changed)):
        (tmp_path / label).mkdir()
        save_file({"w": tensor}, str(tmp_path / label / "model.safetensors"))
    a, b, c = (Checkpoint(tmp_path / label) for label in "abc")
    assert a.same_bytes("w", b, "w") and not a.same_bytes("w", c, "w")
