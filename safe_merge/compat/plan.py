"""A migration plan is a value: the steps (id + note) and refusals for one adapter and one target release,
computed on an in-memory copy before anything is written. Applying it writes a new directory; the input is never
touched."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from packaging.version import Version

from safe_merge.compat.adapter_files import CONFIG_NAME, WEIGHT_NAMES, AdapterFiles
from safe_merge.compat.history import History
from safe_merge.compat.inspect import infer_origin
from safe_merge.compat.migrations import STEPS
from safe_merge.compat.migrations.base import BIN, Context, Refusal, State


@dataclass
class Plan:
    source: str
    target: str
    origin: str
    steps: list[dict] = field(default_factory=list)  # {"id", "note"}
    refusals: list[dict] = field(default_factory=list)  # {"key", "value", "first", "reason"}
    weight_file: str = ""

    @property
    def refused(self) -> bool:
        return bool(self.refusals)

    def report(self) -> dict:
        status = "refused" if self.refused else ("migrate" if self.steps else "loads_as_is")
        return {
            "status": status,
            "source": self.source,
            "target": self.target,
            "origin": self.origin,
            "steps": self.steps,
            "refusals": self.refusals,
            "weight_file": self.weight_file,
        }

    def refusal_message(self) -> str:
        lines = [f"{self.source} cannot be moved to PEFT {self.target} without changing the model:"]
        for r in self.refusals:
            first = f"; first understood by PEFT {r['first']}" if r["first"] else ""
            lines.append(f"  {r['key']} = {json.dumps(r['value'])}: {r['reason']}{first}")
        return "\n".join(lines)


def make_plan(
    adapter: AdapterFiles,
    target: str,
    history: History | None = None,
    base_class: str | None = None,
    transformers: str | None = None,
    base_config: dict | None = None,
) -> tuple[Plan, State]:
    """Run every applicable step on a copy; returns the plan and the migrated state (meaningless if refused).
    ``base_class``, ``transformers`` and ``base_config``: the base the adapter is about to be merged into and the
    installed transformers, for the steps that depend on them (module renames, expert stacks)."""
    history = history or History.load()
    origin = infer_origin(adapter, history)
    state = State(dict(adapter.config), dict(adapter.tensors), adapter.weight_file.name)
    installed = Version(transformers) if transformers else None
    ctx = Context(history, Version(target), Version(origin.lowest), base_class, installed, base_config)
    plan = Plan(str(adapter.path), str(target), origin.describe())
    for step in STEPS:
        if not step.applies(state, ctx):
            continue
        trial = state.copy()
        try:
            note = step.apply(trial, ctx)
        except Refusal as refusal:
            plan.refusals += [
                {"key": r.key, "value": r.value, "first": r.first, "reason": r.reason} for r in refusal.items
            ]
            continue
        state = trial
        plan.steps.append({"id": step.ID, "note": note})
    plan.weight_file = state.weight_name
    return plan, state


def write_state(state: State, source: Path, out: Path) -> list[str]:
    """Write a migrated adapter into ``out`` (an empty staging dir); other files of the source come along."""
    for item in source.iterdir():
        if item.is_file() and item.name not in (CONFIG_NAME, *WEIGHT_NAMES):
            shutil.copyfile(item, out / item.name)
    (out / CONFIG_NAME).write_text(json.dumps(state.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {k: v.detach().contiguous().clone() for k, v in state.tensors.items()}
    if state.weight_name == BIN:
        with open(out / BIN, "wb") as fh:  # Python's own writes: a full disk is an OSError, not torch's stream error
            torch.save(tensors, fh)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(out / state.weight_name), metadata={"format": "pt"})
    return sorted(p.name for p in out.iterdir())
