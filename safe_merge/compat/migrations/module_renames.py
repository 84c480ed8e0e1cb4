"""Adapter keys for a module the installed transformers names otherwise (GPT-NeoX's ``embed_out`` is ``lm_head``
from transformers 5.14): renamed as transformers renames the base's keys, so PEFT loads them onto the module
instead of dropping them. The renames are data (compat/module_renames.json)."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from packaging.version import Version

from safe_merge.compat.keys import PREFIX
from safe_merge.compat.migrations.base import Context, State

ID = "transformers-module-rename"
TABLE = Path(__file__).parent.parent / "module_renames.json"


@cache
def renames() -> list[dict]:
    return json.loads(TABLE.read_text(encoding="utf-8"))["renames"]


def _active(ctx: Context) -> list[dict]:
    """The renames the installed transformers makes for this base's class."""
    if ctx.base_class is None or ctx.transformers is None:
        return []
    return [r for r in renames() if ctx.base_class in r["architectures"] and ctx.transformers >= Version(r["first"])]


def _pattern(rename: dict) -> re.Pattern:
    return re.compile(rf"^{re.escape(PREFIX)}{re.escape(rename['from'])}(?=\.)")


def applies(state: State, ctx: Context) -> bool:
    return any(_pattern(r).match(k) for r in _active(ctx) for k in state.tensors)


def apply(state: State, ctx: Context) -> str:
    notes = []
    for rename in _active(ctx):
        pattern, new = _pattern(rename), f"{PREFIX}{rename['to']}"
        moved = {k: pattern.sub(new, k) for k in state.tensors if pattern.match(k)}
        if not moved:
            continue
        state.tensors = {moved.get(k, k): t for k, t in state.tensors.items()}
        for field in ("target_modules", "modules_to_save"):
            value = state.config.get(field)
            if isinstance(value, list):
                state.config[field] = [rename["to"] if v == rename["from"] else v for v in value]
            elif value == rename["from"]:
                state.config[field] = rename["to"]
        notes.append(
            f"{len(moved)} tensors of {rename['from']!r} renamed {rename['to']!r}, as transformers "
            f"{ctx.transformers} names that module of {ctx.base_class} (from {rename['first']})"
        )
    return "; ".join(notes)
