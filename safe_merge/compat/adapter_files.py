"""Read an adapter directory: its config and its tensors, without ever executing a pickle."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safe_merge.errors import BadInput

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


def load_adapter(adapter_dir: str | Path) -> AdapterFiles:
    """Read a local adapter directory (config first, then the preferred weight file)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise BadInput("not a directory", path=adapter_dir, hint="pass a local adapter directory")
    config = read_config(adapter_dir)
    for name in WEIGHT_NAMES:
        weight_file = adapter_dir / name
        if weight_file.is_file():
            return AdapterFiles(adapter_dir, config, weight_file, read_tensors(weight_file))
    raise BadInput(
        f"no adapter weights ({' or '.join(WEIGHT_NAMES)})",
        path=adapter_dir,
        hint="copy the weight file saved next to adapter_config.json",
    )


def nonfinite_tensors(adapter: AdapterFiles) -> list[str]:
    """Keys of adapter tensors holding NaN or Inf (a diverged or corrupted training run)."""
    return [k for k, t in adapter.tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
