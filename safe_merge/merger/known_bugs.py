"""Merges that a PEFT release is known to get wrong, or to crash on, refused before any work with the release
that fixed them. The windows are data (history.json boundaries), found by running the matrix."""

from __future__ import annotations

import torch

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.history import History
from safe_merge.compat.keys import Role, parse_key
from safe_merge.errors import BadInput


def refuse_known_bugs(adapter: AdapterFiles, release: str, dtype: torch.dtype) -> None:
    history = History.load()
    roles: dict[str, set[Role]] = {}
    for key in adapter.tensors:
        parsed = parse_key(key)
        if parsed is not None and parsed.module:
            roles.setdefault(parsed.module, set()).add(parsed.role)
    dora = sorted(m for m, r in roles.items() if Role.MAGNITUDE in r)
    if not dora:
        return
    if adapter.config.get("fan_in_fan_out") and history.affected("dora_fan_in_fan_out_crashes", release):
        _refuse(
            adapter, release, "dora_fan_in_fan_out_crashes", f"cannot load DoRA on fan_in_fan_out layers ({dora[0]})"
        )
    embeddings = [m for m in dora if Role.EMBEDDING_A in roles[m]]
    if embeddings and history.affected("dora_embedding_merge_wrong", release):
        _refuse(adapter, release, "dora_embedding_merge_wrong", f"merges DoRA on embeddings wrongly ({embeddings[0]})")
    if dtype in (torch.bfloat16, torch.float16) and history.affected("dora_half_precision_merge_raises", release):
        what = f"cannot merge DoRA into a {str(dtype).removeprefix('torch.')} model ({dora[0]})"
        _refuse(adapter, release, "dora_half_precision_merge_raises", what, "or merge with --dtype float32")


def _refuse(adapter: AdapterFiles, release: str, bug: str, what: str, alternative: str = "") -> None:
    fixed = History.load().boundaries[bug]["until"]
    raise BadInput(
        f"the installed PEFT {release} {what}; fixed in {fixed}",
        path=adapter.weight_file,
        key="use_dora",
        hint=f"install peft>={fixed}" + (f", {alternative}" if alternative else ""),
    )
