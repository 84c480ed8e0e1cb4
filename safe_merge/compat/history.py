"""PEFT's adapter-config history as data (history.json), and the one question it answers: may a release that
lacks a key lose it, given this adapter's values?

The table is read, never encoded in if-ladders: migrations, plans, strategies and the matrix all ask it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from packaging.version import Version

TABLE = Path(__file__).with_name("history.json")


def _same(a: object, b: object) -> bool:
    """JSON equality: False is not 0, 1 is not True, {} is not []."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _one_of(value: object, choices: list) -> bool:
    return any(_same(value, c) for c in choices)


@dataclass(frozen=True)
class Entry:
    """One adapter-config key: when it appeared (and left), its default, and when losing it is harmless."""

    key: str
    first: str
    default: object
    drop: str  # "always" | "neutral" | "never"
    effect: str
    neutral: list = field(default_factory=list)
    removed: str | None = None
    irrelevant_when: dict = field(default_factory=dict)
    relevant_when: dict = field(default_factory=dict)

    def present_in(self, release: str | Version) -> bool:
        """Whether that release's LoraConfig has this field."""
        v = Version(str(release))
        return Version(self.first) <= v and (self.removed is None or v < Version(self.removed))

    def harmless_to_drop(self, config: Mapping) -> bool:
        """Whether a release without this key loads the adapter with the same meaning once the key is removed."""
        if self.drop == "always":
            return True
        if self.drop == "never":
            return False
        if any(_one_of(config.get(k), values) for k, values in self.irrelevant_when.items()):
            return True
        if self.relevant_when and not any(_one_of(config.get(k), v) for k, v in self.relevant_when.items()):
            return True
        return _one_of(config.get(self.key, self.default), self.neutral)


@dataclass(frozen=True)
class Verdict:
    """What becomes of one key of an adapter config in a target release."""

    key: str
    action: str  # "keep" | "strip" | "refuse" | "unknown"
    value: object
    reason: str
    first: str | None = None  # the first release that understands the key


NEVER_WRITTEN = frozenset({"runtime_config"})  # fields save_pretrained removes before writing


class History:
    def __init__(
        self,
        entries: dict[str, Entry],
        oldest: str = "0.2.0",
        newest: str = "0.21.2",
        init_values: dict | None = None,
        boundaries: dict | None = None,
        combination_types: dict | None = None,
        base_rewriting_keys: dict | None = None,
        merge_rounding: dict | None = None,
    ):
        self.entries = entries
        self.oldest = oldest  # the releases the table was derived from
        self.newest = newest
        self.init_values = init_values or {}  # init_lora_weights string → {first, kind}
        self.boundaries = boundaries or {}  # format changes without a key: name → {first, note}
        self.combination_types = combination_types or {}  # add_weighted_adapter type → first release
        self.base_rewriting_keys = base_rewriting_keys or {}  # config key → how its value rewrites the base at load
        self.merge_rounding = merge_rounding or {}  # path → layer kind → window where the delta is rounded first

    def boundary(self, name: str) -> Version:
        return Version(self.boundaries[name]["first"])

    def affected(self, name: str, release: str | Version) -> bool:
        """Whether a release lies in a known-bug window [first, until) of the boundaries table."""
        window = self.boundaries[name]
        return Version(window["first"]) <= Version(str(release)) < Version(window["until"])

    def bugs_in(self, release: str | Version) -> list[dict]:
        """The known-bug windows (boundaries with an ``until``: the release that fixed it) a release lies in."""
        return [
            {"name": name, "first": window["first"], "fixed_in": window["until"], "note": window.get("note", "")}
            for name, window in self.boundaries.items()
            if "until" in window and self.affected(name, release)
        ]

    @classmethod
    @cache
    def load(cls, path: Path = TABLE) -> History:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = {key: Entry(key=key, **row) for key, row in data["keys"].items()}
        boundaries = {k: v for k, v in data.get("boundaries", {}).items() if k != "about"}
        init_values = data.get("init_lora_weights_values", {}).get("values", {})
        combinations = {k: v for k, v in data.get("combination_types", {}).items() if k != "about"}
        rewriting = data.get("base_rewriting_keys", {}).get("keys", {})
        rounding = {k: v for k, v in data.get("merge_rounding", {}).items() if k != "about"}
        covers = data["covers"]
        return cls(
            entries, covers["oldest"], covers["newest"], init_values, boundaries, combinations, rewriting, rounding
        )

    def combination_first(self, combination: str) -> Version | None:
        """The first release whose add_weighted_adapter accepts this combination type (None: no release does)."""
        first = self.combination_types.get(combination)
        return Version(first) if first else None

    def keys_in(self, release: str | Version) -> set[str]:
        """The config keys that release's LoraConfig accepts."""
        return {k for k, e in self.entries.items() if e.present_in(release)}

    def assess(self, config: Mapping, target: str | Version) -> list[Verdict]:
        """For each key of ``config``: kept (the target knows it), stripped (it does not, and losing it is
        harmless), refused (losing it would change the model), or unknown (not in the table at all)."""
        verdicts = []
        for key, value in config.items():
            entry = self.entries.get(key)
            if entry is None:
                verdicts.append(Verdict(key, "unknown", value, "not in the history table (newer than it?)"))
            elif entry.present_in(target):
                verdicts.append(Verdict(key, "keep", value, f"known since {entry.first}", entry.first))
            elif entry.harmless_to_drop(config):
                why = "its value never changes the model" if entry.drop == "always" else "its value here is neutral"
                verdicts.append(Verdict(key, "strip", value, f"{target} lacks it; {why}", entry.first))
            elif entry.removed and Version(str(target)) >= Version(entry.removed):
                reason = f"{entry.effect}; no release since {entry.removed} understands it"
                verdicts.append(Verdict(key, "refuse", value, reason, None))
            else:
                verdicts.append(Verdict(key, "refuse", value, entry.effect, entry.first))
        return verdicts
