"""The base before any work: the fields of its config.json that set tensor shapes are sizes (older transformers
accept `"vocab_size": "32"` and fail much later, deep in model building), its weight files are what they claim to
be, and, when the merge builds a model from it, the installed transformers can read that config.

A merge that builds no model (the stream backend without its output check) never asks transformers: importing the
config classes of a 2026 transformers costs seconds and over a hundred MiB, more than the rest of a 1B merge's
fixed costs, and the merged config is the base's with its dtype changed."""

from __future__ import annotations

from pathlib import Path

from safe_merge.errors import BadInput
from safe_merge.io import loading
from safe_merge.io.checkpoint import shard_files

# fields that size tensors, wherever they appear (top level, text_config, vision_config, ...)
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "d_model",
    "num_layers",
)


# what a PyTorch checkpoint starts with: a zip archive (torch.save since 1.6) or a pickle (the legacy format)
BIN_MAGIC = (b"PK\x03\x04", b"\x80")


def readable(base_dir: Path, config) -> None:
    """Refuse a config whose shape fields are not sizes, and a .bin shard that is not a PyTorch checkpoint at all
    (safetensors headers are checked as they are read)."""
    path = base_dir / "config.json"
    _sizes(config.to_dict(), path, "")
    for shard in shard_files(base_dir):
        if shard.suffix == ".bin":
            with open(shard, "rb") as fh:
                start = fh.read(4)
            if not start.startswith(BIN_MAGIC):
                raise BadInput(
                    "not a PyTorch checkpoint (neither a zip archive nor a pickle)",
                    path=shard,
                    hint="the file is damaged: save or download the model again, preferably as safetensors",
                )


def _sizes(data: dict, path: Path, prefix: str) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            _sizes(value, path, f"{prefix}{key}.")
        elif key in SIZE_FIELDS and value is not None and (type(value) is not int or value < 0):
            raise BadInput(
                f"{value!r} is not a size",
                path=path,
                key=f"{prefix}{key}",
                hint="fix config.json (sizes are whole numbers), or save the model again",
            )


def transformers_reads(base_dir: Path) -> None:
    """Refuse a config the installed transformers cannot read, once the merge is known to build a model from it
    (backend.builds_models()): still before anything is written."""
    loading.read_model_config(base_dir)
