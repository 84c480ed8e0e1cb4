"""Write a merged model as a standalone checkpoint: sharded safetensors, configs, tokenizer; no adapter files."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from torch import nn

from safe_merge.errors import BadInput

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
DEFAULT_SHARD_SIZE = "5GB"


def tokenizer_source(adapter_dir: Path, base_dir: Path) -> Path | None:
    """The adapter's own tokenizer when it saved one (it may add tokens), else the base's."""
    for directory in (adapter_dir, base_dir):
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            return directory
    return None


def tokenizer_size(directory: Path) -> int | None:
    """Number of token ids a saved fast tokenizer can produce (highest id + 1), or None without tokenizer.json."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") or {}
    except (ValueError, AttributeError) as exc:
        raise BadInput(
            f"tokenizer.json is not a tokenizer ({type(exc).__name__}: {exc})",
            path=path,
            hint="save the tokenizer again with save_pretrained, or remove the broken file",
        ) from exc
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in data.get("added_tokens") or [] if "id" in t]
    return max(ids) + 1 if ids else None


def write_model(
    model: nn.Module, out: Path, base_dir: Path, adapter_dir: Path, max_shard_size: str = DEFAULT_SHARD_SIZE
) -> list[str]:
    """Save ``model`` into ``out`` (an empty staging dir) and carry the files a user expects; returns file names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    carry_files(out, base_dir, adapter_dir)
    for name in ADAPTER_FILES:  # a standalone model carries no adapter
        (out / name).unlink(missing_ok=True)
    return sorted(p.name for p in out.iterdir())


def carry_files(out: Path, base_dir: Path, adapter_dir: Path) -> None:
    """The files a user expects beside the weights: the base's generation config, and the tokenizer (the
    adapter's own when it saved one)."""
    base_generation = base_dir / "generation_config.json"
    if base_generation.is_file():
        shutil.copyfile(base_generation, out / "generation_config.json")
    source = tokenizer_source(adapter_dir, base_dir)
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
