"""The merged checkpoint's config.json against the base's: a merge changes weights, not the model's definition.

Weights and probe outputs cannot see every config edit (a rope scaling that starts beyond the probes' length,
rope_theta moved with max_position_embeddings), so the config is compared field by field. Only what a merge sets
on purpose may differ: the dtype it wrote, bookkeeping, ties it broke, a quantization it removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from safe_merge.errors import BadInput

BOOKKEEPING = {"torch_dtype", "dtype", "transformers_version", "_name_or_path", "_commit_hash"}


def config_changes(base_dir: Path, merged_dir: Path, expected: dict | None = None) -> list[str]:
    """One line per field the merged config changes beyond what a merge sets; empty when they agree.
    ``expected``: fields the adapter itself changes (a deeper stack's depth), with their value after the merge.

    The files are compared first; when they differ, the configs as transformers reads them (a writer such as
    save_pretrained fills in defaults and renames old keys, which changes the file but not the model)."""
    expected = expected or {}
    base, merged = {**_read(base_dir), **expected}, _read(merged_dir)
    changes = differences(base, merged)
    if changes:
        changes = differences({**_as_loaded(base_dir), **expected}, _as_loaded(merged_dir))
    return [f"config.json {key}: base {before!r}, merged {after!r}" for key, before, after in changes]


def differences(base: dict, merged: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(base) | set(merged), key=str):  # id2label's keys are ints once loaded
        before, after = base.get(key, _ABSENT), merged.get(key, _ABSENT)
        name = f"{prefix}{key}"
        if key in BOOKKEEPING or before == after or _set_by_merge(key, before, after):
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            out += differences(before, after, f"{name}.")
        else:
            out.append((name, before, after))
    return out


def _set_by_merge(key: str, before, after) -> bool:
    if key == "tie_word_embeddings":  # untied when the adapter changes one of the tied tensors
        return after is False
    if key == "quantization_config":  # dequantized: the merged model is written in floats
        return after is _ABSENT
    return False


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _read(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read config.json ({exc})", path=path) from exc
    if not isinstance(data, dict):
        raise BadInput("config.json does not hold an object", path=path)
    return data


def _as_loaded(model_dir: Path) -> dict:
    from safe_merge.io.loading import read_model_config

    return read_model_config(model_dir).to_dict()
