"""The merged checkpoint's files beside the weights: a merge changes weights, not the model's definition, its
generation defaults or its tokenizer, and its index must describe exactly the tensors its shards hold.

- config.json: field by field against the base's (config_check.py);
- generation_config.json: the base's, field by field (a merged checkpoint without one, where the base has one,
  generates differently);
- tokenizer and processor files: byte for byte the source's (the adapter's own when it saved them, else the
  base's);
  a JSON file that differs only in formatting passes. A file absent from the merged checkpoint is not a
  problem (merge_and_unload + save_pretrained writes none); one that is there and differs is;
- the shard index: every tensor it maps is in the shard it names, and every tensor of every shard file in the
  directory is in the index (a tensor outside the index is invisible to transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

from safe_merge.io.model_dir import CARRIED, carried_source
from safe_merge.io.shards import INDEX
from safe_merge.io.tensorfile import read_header
from safe_merge.verifier.config_check import BOOKKEEPING, config_changes, differences


def file_problems(base_dir: Path, adapter_dir: Path, merged_dir: Path, expected: dict | None = None) -> list[str]:
    """Every problem with the merged checkpoint's files, one line each, the file named."""
    return (
        config_changes(base_dir, merged_dir, expected)
        + generation_changes(base_dir, merged_dir)
        + carried_changes(base_dir, adapter_dir, merged_dir)
        + index_problems(merged_dir)
    )


def generation_changes(base_dir: Path, merged_dir: Path) -> list[str]:
    name = "generation_config.json"
    if not (base_dir / name).is_file():
        return []
    if not (merged_dir / name).is_file():
        return [f"{name}: the base has one, the merged checkpoint none (it would generate with other defaults)"]
    base, merged = _json(base_dir / name), _json(merged_dir / name)
    if base is None or merged is None:
        return [f"{name}: not a JSON object"] if merged is None else []
    changes = differences(base, merged)
    if changes:
        changes = differences(_generation_as_loaded(base_dir), _generation_as_loaded(merged_dir))
    return [f"{name} {key}: base {before!r}, merged {after!r}" for key, before, after in changes]


def carried_changes(base_dir: Path, adapter_dir: Path, merged_dir: Path) -> list[str]:
    """The tokenizer and processor files against their source, byte for byte (a JSON file may differ in format)."""
    out = []
    for group in CARRIED:
        source = carried_source(group, adapter_dir, base_dir)
        for name in group if source is not None else ():
            theirs, ours = source / name, merged_dir / name
            if not theirs.is_file() or not ours.is_file() or theirs.read_bytes() == ours.read_bytes():
                continue
            if name.endswith(".json") and _json(theirs) is not None and _json(theirs) == _json(ours):
                continue  # the same content, formatted otherwise
            out.append(f"{name}: differs from the {'adapter' if source == adapter_dir else 'base'}'s ({theirs})")
    return out


def index_problems(merged_dir: Path) -> list[str]:
    """The index against the shards' headers; shard files the index does not name count too."""
    index_path = merged_dir / INDEX
    shards = sorted(p.name for p in merged_dir.glob("*.safetensors"))
    if not index_path.is_file():
        extra = [s for s in shards if s != "model.safetensors"]
        return [f"{s}: a shard file without an index naming it" for s in extra] if extra else []
    weight_map = (_json(index_path) or {}).get("weight_map")
    if not isinstance(weight_map, dict):
        return [f"{INDEX}: no weight_map"]
    held: dict[str, str] = {}
    for shard in shards:
        header = read_header(merged_dir / shard)[0]
        held.update(dict.fromkeys(header, shard))
    out = []
    for tensor, shard in sorted(weight_map.items()):
        if tensor not in held:
            out.append(f"{INDEX} maps {tensor} to {shard}, which does not hold it")
        elif held[tensor] != shard:
            out.append(f"{INDEX} maps {tensor} to {shard}, but it is in {held[tensor]}")
    outside = sorted(set(held) - set(weight_map))
    if outside:
        out.append(f"{held[outside[0]]} holds {len(outside)} tensors the index does not name (first: {outside[0]})")
    return out


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _generation_as_loaded(model_dir: Path) -> dict:
    from transformers import GenerationConfig

    data = GenerationConfig.from_pretrained(str(model_dir)).to_dict()
    return {k: v for k, v in data.items() if k not in BOOKKEEPING}
