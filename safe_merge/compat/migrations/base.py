"""What a migration step sees and returns."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from packaging.version import Version

from safe_merge.compat.history import History
from safe_merge.compat.keys import targeted_modules

SAFETENSORS = "adapter_model.safetensors"
BIN = "adapter_model.bin"


@dataclass
class State:
    """An adapter being migrated, in memory: its config, its tensors (keys as on disk) and its weight file name."""

    config: dict
    tensors: dict[str, torch.Tensor]
    weight_name: str

    def copy(self) -> State:
        return State(copy.deepcopy(self.config), dict(self.tensors), self.weight_name)

    def targeted_modules(self) -> set[str]:
        """Module paths that carry LoRA tensors."""
        return targeted_modules(self.tensors)


@dataclass
class Context:
    """What every step may consult: the table, the target release and the release range that wrote the input."""

    history: History
    target: Version
    origin_lowest: Version
    base_class: str | None = None  # the base model's class, when the adapter is about to meet one
    transformers: Version | None = None  # the installed transformers, with base_class
    base_config: dict | None = None  # the base's config.json, with base_class

    @property
    def downgrade(self) -> bool:
        return self.target < self.origin_lowest


@dataclass(frozen=True)
class Refused:
    """One key that cannot move: its value, the first release that understands it, and why."""

    key: str
    value: object
    first: str | None
    reason: str


class Refusal(Exception):
    """Dropping or converting these keys would change the model."""

    def __init__(self, *items: Refused):
        super().__init__("; ".join(f"{r.key}={r.value!r}: {r.reason}" for r in items))
        self.items = items
