"""Inspect an adapter directory: what it is, which PEFT release could have written it, what it uses, and how each
config key fares in a target release.

PEFT's save_pretrained writes every LoraConfig field, defaults included. So a key that is present says the writer
is at least the key's first release, and a key that is absent says the writer is older than the key's first
release. `peft_version` (0.18+) records the release that *created* the config, not the one that wrote the file,
so it is reported next to the inferred range, never instead of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.version import Version

from safe_merge.compat.adapter_files import AdapterFiles, load_adapter
from safe_merge.compat.history import NEVER_WRITTEN, History, Verdict
from safe_merge.compat.keys import Role, parse_key


@dataclass
class Origin:
    """The releases consistent with the files: at least ``lowest``, and older than ``below`` when that is set.
    ``consistent`` is False when no release in the table writes exactly this key set (an edited config, another
    tool, or a release newer than the table)."""

    lowest: str
    below: str | None
    consistent: bool
    evidence: list[str] = field(default_factory=list)
    peft_version: str | None = None  # what the config says created it

    def contains(self, release: str) -> bool:
        v = Version(release)
        return self.consistent and Version(self.lowest) <= v and (self.below is None or v < Version(self.below))

    def describe(self) -> str:
        if not self.consistent:
            return "no release in the table writes this key set"
        return f">= {self.lowest}" + (f", older than {self.below}" if self.below else "")


def infer_origin(adapter: AdapterFiles, history: History) -> Origin:
    """The range of releases whose save_pretrained could have written these files.

    A present key K: writer >= first(K), and older than removed(K) when K was removed. An absent key K: writer
    older than first(K), or (for a removed key) at least removed(K).
    """
    config = adapter.config
    lows: list[tuple[Version, str]] = [(Version(history.oldest), "oldest release in the table")]
    highs: list[tuple[Version, str]] = []
    for key, entry in history.entries.items():
        if key in NEVER_WRITTEN:
            continue
        first = Version(entry.first)
        removed = Version(entry.removed) if entry.removed else None
        if key in config:
            lows.append((first, f"config has {key!r} (written from {entry.first})"))
            if removed:
                highs.append((removed, f"config has {key!r} (not written since {entry.removed})"))
        elif removed and first <= Version(history.oldest):
            lows.append((removed, f"config lacks {key!r} (written only before {entry.removed})"))
        elif not removed:
            highs.append((first, f"config lacks {key!r} (written by every release since {entry.first})"))
    lows += [(Version(r), why) for r, why in _weight_hints(adapter)]
    unknown = sorted(set(config) - set(history.entries))
    lowest, low_why = max(lows)
    below, high_why = min(highs) if highs else (None, "")
    consistent = not unknown and (below is None or lowest < below)
    evidence = [low_why] + ([high_why] if high_why else [])
    if unknown:
        evidence.append(f"keys the table does not know (newer than {history.newest}?): {', '.join(unknown)}")
    return Origin(str(lowest), str(below) if below else None, consistent, evidence, config.get("peft_version"))


def _weight_hints(adapter: AdapterFiles) -> list[tuple[str, str]]:
    """Lower bounds read from the weight file itself."""
    hints = []
    if adapter.weight_file.suffix == ".safetensors":
        hints.append(("0.4.0", "weights are .safetensors (written from 0.4.0)"))
    for key in adapter.tensors:
        parsed = parse_key(key)
        if parsed and parsed.role is Role.BASE_LAYER_PARAM and key.endswith(".base_layer.bias"):
            hints.append(("0.7.0", f"{key} uses the base_layer naming of 0.7.0"))
            break
    return hints


FEATURE_KEYS = {
    "use_rslora": "rsLoRA",
    "use_dora": "DoRA",
    "lora_bias": "lora_bias",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer_replication",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "layers_to_transform": "layers_to_transform",
    "target_parameters": "target_parameters",
    "exclude_modules": "exclude_modules",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
    "megatron_config": "Megatron",
    "fan_in_fan_out": "fan_in_fan_out",
}


def features(adapter: AdapterFiles, history: History) -> list[str]:
    """Features in use: config keys holding a value other than their neutral one, plus what the tensors show."""
    out = []
    for key, label in FEATURE_KEYS.items():
        entry = history.entries.get(key)
        value = adapter.config.get(key)
        if entry is not None and key in adapter.config and not _is_default(value, entry.default):
            out.append(label)
    if adapter.config.get("bias", "none") != "none":
        out.append(f"bias={adapter.config['bias']}")
    init = adapter.config.get("init_lora_weights", True)
    if init not in (True, False):
        out.append(f"init_lora_weights={init}")
    roles = {parsed.role for parsed in map(parse_key, adapter.tensors) if parsed}
    if Role.EMBEDDING_A in roles:
        out.append("embedding LoRA")
    if Role.TOKEN_DELTA in roles and "trainable tokens" not in out:
        out.append("trainable tokens")
    return out


def _is_default(value: object, default: object) -> bool:
    return value == default or value in (None, False, {}, [])


@dataclass
class Inspection:
    path: str
    peft_type: str
    weight_file: str
    origin: Origin
    features: list[str]
    tensors: dict[str, list[int]]
    target: str
    verdicts: list[Verdict]
    plan: dict

    @property
    def status(self) -> str:
        """What migrating to the target would do: refused, needs_migration, or loads (as it is)."""
        return {"refused": "refused", "migrate": "needs_migration"}.get(self.plan["status"], "loads")

    def report(self) -> dict:
        return {
            "status": self.status,
            "path": self.path,
            "peft_type": self.peft_type,
            "weight_file": self.weight_file,
            "origin": {**asdict(self.origin), "range": self.origin.describe()},
            "features": self.features,
            "target": self.target,
            "keys": {
                action: [
                    {"key": v.key, "value": v.value, "reason": v.reason, "first": v.first}
                    for v in self.verdicts
                    if v.action == action
                ]
                for action in ("keep", "strip", "refuse", "unknown")
            },
            "plan": {"steps": self.plan["steps"], "refusals": self.plan["refusals"]},
            "tensors": self.tensors,
        }


def inspect_adapter(path: str | Path, target: str, history: History | None = None) -> Inspection:
    """Read an adapter dir and assess it for the ``target`` PEFT release."""
    from safe_merge.compat.plan import make_plan

    history = history or History.load()
    adapter = load_adapter(path)
    plan, _ = make_plan(adapter, target, history)
    return Inspection(
        path=str(adapter.path),
        peft_type=adapter.peft_type,
        weight_file=adapter.weight_file.name,
        origin=infer_origin(adapter, history),
        features=features(adapter, history),
        tensors={k: list(v.shape) for k, v in sorted(adapter.tensors.items())},
        target=target,
        verdicts=history.assess(adapter.config, target),
        plan=plan.report(),
    )
