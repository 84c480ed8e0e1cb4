"""A stored quantized checkpoint as the stream backend reads it: every quantized weight one float tensor (its
parts hidden, read and dequantized together on demand, in the place its first part was stored), every other
tensor as stored. It answers like io.checkpoint.Checkpoint, so the ledger, the layout and the merge see a
float model; ``stored`` is the checkpoint as it is on disk, for writing the format back."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from safe_merge.errors import BadInput
from safe_merge.io.checkpoint import Checkpoint, TensorInfo
from safe_merge.quant.stored.codec import Codec, Group, codec_name
from safe_merge.quant.stored.fp4 import MXFP4Experts, NVFP4Packed
from safe_merge.quant.stored.fp8 import BlockFP8, FloatQuantized
from safe_merge.quant.stored.gptq import AWQ, GPTQ
from safe_merge.quant.stored.integer import IntegerQuantized

CODECS: dict[str, Codec] = {
    c.name: c for c in (BlockFP8(), FloatQuantized(), IntegerQuantized(), MXFP4Experts(), NVFP4Packed(), GPTQ(), AWQ())
}


class StoredView:
    """The logical tensors of a quantized checkpoint (see the module's docstring)."""

    def __init__(self, stored: Checkpoint, quant: Mapping, dtype: torch.dtype):
        self.stored = stored
        self.quant = quant
        self.codec = CODECS[codec_name(quant)]
        self.dtype = dtype
        self.dir, self.shards, self.format = stored.dir, stored.shards, stored.format
        self.groups: dict[str, Group] = {g.name: g for g in self.codec.groups(stored.tensors, quant, stored.read)}
        if not self.groups:
            raise BadInput(
                f"config.json declares quant_method {quant.get('quant_method')!r}, but no tensor of the checkpoint "
                f"is stored that way ({self.codec.name})",
                path=stored.dir / "config.json",
                key="quantization_config",
                hint="the config and the weights belong to different models: save them together again",
            )
        self.part_of = {part: g.name for g in self.groups.values() for part in g.stored}
        self.tensors: dict[str, TensorInfo] = {}
        self.order: dict[Path, list[str]] = {}
        item = torch.tensor([], dtype=dtype).element_size()
        for shard, names in stored.order.items():
            row = self.order[shard] = []
            for name in names:
                logical = self.part_of.get(name, name)
                if logical in self.tensors:
                    continue
                if logical in self.groups:
                    shape = self.groups[logical].shape
                    info = TensorInfo(logical, shard, dtype, shape, -1, math.prod(shape) * item)
                else:
                    info = stored.tensors[name]
                self.tensors[logical] = info
                row.append(logical)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def parts(self, group: Group, checkpoint: Checkpoint | None = None) -> dict[str, torch.Tensor]:
        """A group's stored tensors by role (from ``checkpoint``, the base's by default)."""
        source = checkpoint or self.stored
        return {role: source.read(name) for role, name in group.parts.items()}

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        group = self.groups.get(name)
        if group is None:
            return self.stored.read(name, out=out)
        value = self.codec.dequantize(group, self.parts(group), self.dtype)
        return out.copy_(value) if out is not None else value

    def same_bytes(self, name: str, other: Checkpoint, other_name: str, chunk: int = 2**24) -> bool:
        return self.stored.same_bytes(name, other, other_name, chunk)

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


def open_checkpoint(model_dir: Path, config: Mapping, dtype: torch.dtype) -> Checkpoint | StoredView:
    """The checkpoint of a model directory, seen through its quantization format when safe-merge reads it."""
    checkpoint = Checkpoint(model_dir)
    quant = config.get("quantization_config")
    if isinstance(quant, Mapping) and codec_name(quant) is not None:
        return StoredView(checkpoint, quant, dtype)
    return checkpoint
