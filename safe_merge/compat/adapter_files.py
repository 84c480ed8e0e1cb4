"""Read an adapter directory: its config and its tensors, without ever executing a pickle."""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safe_merge.errors import BadInput
from safe_merge.io.tensorfile import DTYPE_NAMES, read_header

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class AdapterFiles:
    """An adapter as it is on disk: config dict, the weight file used and its tensors (keys as written)."""

    path: Path
    config: dict
    weight_file: Path
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", ""))


def read_config(adapter_dir: Path) -> dict:
    """Load adapter_config.json, with an error that names the file when it is missing or malformed."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise BadInput(
            "no adapter_config.json here",
            path=adapter_dir,
            hint="pass the directory that PeftModel.save_pretrained wrote",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"not valid JSON ({exc})", path=path, hint="restore the file the trainer saved") from exc
    if not isinstance(config, dict):
        raise BadInput("the top level is not a JSON object", path=path)
    return config


def read_tensors(weight_file: Path) -> dict[str, torch.Tensor]:
    """Read adapter tensors from .safetensors, or from .bin with torch's weights-only unpickler."""
    try:
        if weight_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(weight_file))
        else:
            tensors = torch.load(str(weight_file), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors share no base class
        raise BadInput(
            f"cannot read the weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            path=weight_file,
            hint="the file may be truncated or not a plain tensor file; save the adapter again",
        ) from exc
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise BadInput("the weight file does not hold a flat dict of tensors", path=weight_file)
    return tensors


def map_tensors(weight_file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of a private mapping of the file: nothing is read until a tensor is
    used, and ``return_pages`` hands a used tensor's pages back (they are read again if it is used again)."""
    hint = "the file may be truncated or not a plain tensor file; save the adapter again"
    header, _, start = read_header(weight_file)  # names the file, the key and what is wrong
    with open(weight_file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        mapped = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) if size else None
    out = {}
    for key, entry in header.items():
        dtype = DTYPE_NAMES.get(entry.get("dtype"))
        begin, end = entry["data_offsets"]  # read_header checked every range against the file
        if dtype is None:
            raise BadInput(f"cannot read the weights (dtype {entry['dtype']})", path=weight_file, key=key, hint=hint)
        if end == begin:
            out[key] = torch.empty(entry["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        out[key] = flat.reshape(entry["shape"])
    return _Mapped(out, mapped, start, header)


class _Mapped(dict):
    """Tensors viewing one file mapping, with the byte ranges needed to release their pages."""

    def __init__(self, tensors: dict, mapping, start: int, header: dict):
        super().__init__(tensors)
        self.mapping, self.start, self.header = mapping, start, header


def return_pages(tensors: dict[str, torch.Tensor], keys) -> None:
    """Hand back the pages of mapped tensors once used (a no-op for tensors read into memory)."""
    if not isinstance(tensors, _Mapped) or tensors.mapping is None:
        return
    page = mmap.PAGESIZE
    for key in keys:
        begin, end = tensors.header[key]["data_offsets"]
        first = (tensors.start + begin) // page * page
        last = -(-(tensors.start + end) // page) * page
        if last > first:
            tensors.mapping.madvise(mmap.MADV_DONTNEED, first, min(last, len(tensors.mapping)) - first)


def load_adapter(adapter_dir: str | Path, *, mapped: bool = False) -> AdapterFiles:
    """Read a local adapter directory (config first, then the preferred weight file). ``mapped`` maps a
    safetensors file instead of reading it (see map_tensors)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise BadInput("not a directory", path=adapter_dir, hint="pass a local adapter directory")
    config = read_config(adapter_dir)
    for name in WEIGHT_NAMES:
        weight_file = adapter_dir / name
        if weight_file.is_file():
            if mapped and weight_file.suffix == ".safetensors":
                return AdapterFiles(adapter_dir, config, weight_file, map_tensors(weight_file))
            return AdapterFiles(adapter_dir, config, weight_file, read_tensors(weight_file))
    raise BadInput(
        f"no adapter weights ({' or '.join(WEIGHT_NAMES)})",
        path=adapter_dir,
        hint="copy the weight file saved next to adapter_config.json",
    )


def nonfinite_tensors(adapter: AdapterFiles) -> list[str]:
    """Keys of adapter tensors holding NaN or Inf (a diverged or corrupted training run)."""
    out = []
    for key, tensor in adapter.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            out.append(key)
        return_pages(adapter.tensors, [key])
    return out
