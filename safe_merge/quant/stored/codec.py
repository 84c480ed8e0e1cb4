"""What a codec is: it finds the groups of stored tensors that make one quantized weight, turns a group into
the float weight exactly as the format's own library does (dequantize), writes a float weight back in the same
format with fresh scales (quantize), and bounds the rounding that costs each element (budget)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Protocol

import torch

from safe_merge.io.checkpoint import TensorInfo

FORMATS_FILE = Path(__file__).with_name("formats.json")


Reader = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Group:
    """One quantized weight: its name and shape as the model sees it (float), and its stored parts by role."""

    name: str
    shape: tuple[int, ...]
    parts: Mapping[str, str]  # role → stored tensor name
    settings: Mapping = field(default_factory=dict)  # block / group sizes, bits, symmetry: what the codec needs

    @property
    def stored(self) -> tuple[str, ...]:
        return tuple(self.parts.values())


class Codec(Protocol):
    name: str

    def groups(self, tensors: Mapping[str, TensorInfo], quant: Mapping, read: Reader) -> list[Group]:
        """Every quantized weight among the stored tensors (``read`` reads a small stored tensor by name)."""
        ...

    def dequantize(self, group: Group, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The float weight in ``dtype``, bit for bit as the format's library loads it into a model of ``dtype``."""
        ...

    def quantize(self, group: Group, weight: torch.Tensor, stored: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
        """``weight`` in the group's format, with fresh scales, each part in its stored dtype and shape."""
        ...

    def budget(self, group: Group, exact: torch.Tensor) -> torch.Tensor:
        """Per element, how far quantize-then-dequantize may move ``exact`` (float64)."""
        ...


CODEC_BITS = {"fp8_block": 8, "ct_float": 8, "mxfp4": 4, "ct_nvfp4": 4}  # the others say it in the config


@cache
def table() -> dict:
    return json.loads(FORMATS_FILE.read_text(encoding="utf-8"))


def codec_name(quant: Mapping) -> str | None:
    """The codec for a config's quantization_config (None: not a stored format safe-merge reads)."""
    entry = table()["methods"].get(str(quant.get("quant_method")))
    if entry is None:
        return None
    if "by_format" in entry:
        return entry["by_format"].get(_ct_format(quant))
    return entry["codec"]


def stored_scheme(quant: Mapping) -> str:
    """One line on a stored format: what it is and its tiles, for --plan and the report."""
    method = str(quant.get("quant_method"))
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)]
        first = weights[0] if weights else {}
        tile = first.get("group_size") or first.get("block_structure") or ""
        kind = f"{first.get('type', '?')}{first.get('num_bits', '?')}"
        return f"{_ct_format(quant)}, {kind} per {first.get('strategy', 'tensor')}" + (f" {tile}" if tile else "")
    describe = table()["methods"].get(method, {}).get("describe", method)
    block = quant.get("weight_block_size")
    if block:
        return f"{describe}, blocks of {block[0]}x{block[1]}"
    group = quant.get("group_size")
    return describe + (f", groups of {group}" if group else "")


def _ct_format(quant: Mapping) -> str | None:
    """compressed-tensors' format: one for the checkpoint, or the same one in every scheme."""
    found = {g.get("format") for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)}
    found.discard(None)
    if quant.get("format") and quant.get("format") != "mixed-precision":
        return str(quant["format"])
    return found.pop() if len(found) == 1 else None


def sibling_parts(
    tensors: Mapping[str, TensorInfo], name: str, required: Mapping[str, str], optional: Mapping[str, str] = {}
) -> dict[str, str] | None:
    """The stored tensors of ``name``'s module that make one quantized weight, by role (role → the name after
    the module's): None when a required one is missing; optional ones where present."""
    module = name.rpartition(".")[0]
    parts = {role: f"{module}.{leaf}" for role, leaf in required.items()}
    if not all(p in tensors for p in parts.values()):
        return None
    return {**parts, **{role: f"{module}.{leaf}" for role, leaf in optional.items() if f"{module}.{leaf}" in tensors}}


def tile(group: Group) -> tuple[int, int]:
    """The rows × columns one scale covers in a group's weight (its ``block`` setting; None: the whole weight)."""
    rows, cols = group.shape[-2:]
    block = group.settings.get("block")
    return (min(block[0], rows), min(block[1], cols)) if block else (rows, cols)


def scale_grid(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """A block grid of scales spread over a [rows, cols] weight (leading dims kept): each scale covers a
    block[0] × block[1] tile, the last tiles cut at the edge (the ceil grid DeepSeek and vLLM store)."""
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def block_amax(value: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |value| per block[0] × block[1] tile of the last two dims (partial tiles at the edges included)."""
    rows, cols = value.shape[-2:]
    pad_r, pad_c = (-rows) % block[0], (-cols) % block[1]
    padded = torch.nn.functional.pad(value.abs(), (0, pad_c, 0, pad_r))
    lead = padded.shape[:-2]
    tiles = padded.reshape(*lead, (rows + pad_r) // block[0], block[0], (cols + pad_c) // block[1], block[1])
    return tiles.amax(dim=(-3, -1))
