"""A job: the request with its inputs read (the base's directory and config, each adapter and its migration plan,
the quantization, the dtype). Fields are read on first use, in the order the preflight asks for them, so a
refusal comes before any later input is read; once the preflight has passed, every backend may rely on them."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safe_merge.compat.adapter_files import AdapterFiles, load_adapter, read_config
from safe_merge.compat.migrations.base import State
from safe_merge.compat.plan import Plan, make_plan, write_state
from safe_merge.errors import BadInput, SafeMergeError
from safe_merge.io import loading
from safe_merge.io.hub import HubOrigin, Resolved, resolve
from safe_merge.merger.request import MergeRequest
from safe_merge.merger.rules import adapters as adapter_rules
from safe_merge.merger.rules import rule
from safe_merge.quant import formats
from safe_merge.quant.formats import Quantization
from safe_merge.verifier.combination_types import Combination
from safe_merge.verifier.verdict import require_lora, require_unchanged_base


@dataclass
class AdapterSource:
    """One adapter as the user gave it (never written to), and its migration to the installed PEFT."""

    path: Path
    files: AdapterFiles
    plan: Plan
    state: State
    origin: HubOrigin | None = None  # the hub repo and commit it was downloaded from

    def drop_tensors(self) -> None:
        """Drop the tensors (config, plan and paths stay for the report)."""
        self.files.tensors = {}
        self.state.tensors = {}

    def materialize(self, directory: Path) -> Path:
        """The directory to read the adapter from: the user's own, or, when the plan migrates it, a copy written into
        ``directory`` (created here; the input is never touched)."""
        if not self.plan.steps:
            return self.path
        directory.mkdir()
        write_state(self.state, self.path, directory)
        return directory

    def report(self, weight: float | None = None) -> dict:
        out = {
            "path": str(self.path),
            **({"hub": self.origin.report()} if self.origin else {}),
            "origin_peft": self.plan.origin,
            "peft_version": self.files.config.get("peft_version"),
            "migrations": self.plan.steps,
        }
        if weight is not None:
            out["weight"] = weight
        return out


def read_source(
    path: Path,
    peft_release: str,
    refusal: type[SafeMergeError] = BadInput,
    base_class: str | None = None,
    base_config: dict | None = None,
) -> AdapterSource:
    """Read one adapter and plan its migration to ``peft_release`` (and the installed transformers' names for
    ``base_class``), under the adapter rules (a migration the release cannot take raises ``refusal``)."""
    files = load_adapter(path, mapped=True)
    with rule("lora-only"):
        require_lora(files)
    with rule("well-formed-config"):
        adapter_rules.well_formed(files)
    with rule("finite-adapter"):
        adapter_rules.finite(files)
    with rule("base-rewriting-init"):
        require_unchanged_base(files)
    installed = loading.installed("transformers")
    plan, state = make_plan(files, peft_release, base_class=base_class, transformers=installed, base_config=base_config)
    with rule("migratable"):
        adapter_rules.migratable(plan, refusal)
    return AdapterSource(path, files, plan, state)


def named_base(adapter_dirs: list[Path]) -> str:
    """The base the adapters name in adapter_config.json (base_model_name_or_path): one, or a refusal."""
    names = {}
    for directory in adapter_dirs:
        path = directory / "adapter_config.json"
        config = read_config(directory)
        name = config.get("base_model_name_or_path")
        if not isinstance(name, str) or not name:
            raise BadInput(
                "names no base model",
                path=path,
                key="base_model_name_or_path",
                hint="pass BASE before the adapter: safe-merge merge BASE ADAPTER -o OUT",
            )
        names[name] = path
    if len(names) > 1:
        listed = ", ".join(f"{n!r} ({p})" for n, p in names.items())
        raise BadInput(f"the adapters name different bases: {listed}", hint="pass BASE before the adapters")
    return next(iter(names))


@dataclass
class Job:
    """What the preflight read and checked; backends and the pipeline take it from here."""

    request: MergeRequest
    started: float = field(default_factory=time.monotonic)
    _resolved: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def out(self) -> Path:
        return self.request.out

    @property
    def combination(self) -> Combination | None:
        return self.request.combination

    @property
    def policy(self) -> str:
        return self.request.quantized

    @functools.cached_property
    def peft_release(self) -> str:
        return loading.installed_peft()

    def _resolve(self, ref: str, what: str, revision: str | None) -> Resolved:
        """Each input resolved once per job: a hub branch that moves meanwhile cannot give two commits."""
        key = (ref, what, revision)
        if key not in self._resolved:
            self._resolved[key] = resolve(ref, what, revision)
        return self._resolved[key]

    @functools.cached_property
    def base(self) -> Resolved:
        revision = self.request.base_revision
        if revision is None and self.request.base is None:  # as AutoPeftModel: the revision the adapter names
            revision = read_config(self._adapters[0].path).get("revision") or None
        return self._resolve(self.base_name, "base model", revision)

    @property
    def base_dir(self) -> Path:
        return self.base.path

    @functools.cached_property
    def base_name(self) -> str:
        """BASE as given, or, without it, the base every adapter names (as AutoPeftModel finds it)."""
        if self.request.base is not None:
            return self.request.base
        return named_base([a.path for a in self._adapters])

    @property
    def _adapters(self) -> list[Resolved]:
        return [self._resolve(a, "adapter", self.request.revision) for a in self.request.adapters]

    @functools.cached_property
    def adapter_dirs(self) -> list[Path]:
        return [a.path for a in self._adapters]

    @property
    def inputs(self) -> dict[str, Path]:
        """Every input that exists, by what it is, for the output-path rule (a missing one is refused by the next
        rules, which name it). The adapters come first: a missing one is named before a hub base, which may be
        gigabytes, is downloaded."""
        adapters: dict[str, Path] = {}
        many = len(self.request.adapters) > 1
        for i, ref in enumerate(self.request.adapters):
            try:
                adapters[f"adapter {i + 1}" if many else "adapter"] = self._resolve(
                    ref, "adapter", self.request.revision
                ).path
            except BadInput:
                return adapters
        base: dict[str, Path] = {}
        with contextlib.suppress(BadInput):
            base["base model"] = self.base_dir
        return {**base, **adapters}  # the base named first where OUT holds several inputs

    def revision_notes(self) -> list[str]:
        """A --revision or --base-revision that named no hub input is said, not dropped in silence."""
        notes = []
        if self.request.revision is not None and not any(a.origin for a in self._adapters):
            notes.append(f"--revision {self.request.revision} is for hub adapters; every adapter is a local directory")
        if self.request.base_revision is not None and self.base.origin is None:
            notes.append(
                f"--base-revision {self.request.base_revision} is for a hub base; the base is a local directory"
            )
        return notes

    @functools.cached_property
    def sources(self) -> list[AdapterSource]:
        paths = self.adapter_dirs  # before the base: a missing adapter is named before a hub base is downloaded
        try:
            base_class, base_config = loading.class_name(self.base_config), self.base_config.to_dict()
        except BadInput:
            base_class, base_config = None, None  # the base-readable rule names what is wrong with it
        sources = []
        for path, resolved in zip(paths, self._adapters, strict=True):
            source = read_source(path, self.peft_release, base_class=base_class, base_config=base_config)
            source.origin = resolved.origin
            sources.append(source)
        return sources

    @property
    def adapter_files(self) -> list[AdapterFiles]:
        return [s.files for s in self.sources]

    @functools.cached_property
    def base_config(self):
        return loading.read_config_json(self.base_dir)

    @functools.cached_property
    def quant(self) -> Quantization | None:
        return formats.from_config(self.base_config)

    @functools.cached_property
    def stored_dtype(self) -> torch.dtype:
        """The dtype most of the base's floating tensors are stored in (headers, else the config); for a format
        read as stored, the config's (the dtype its loader dequantizes into)."""
        if self.quant is not None and self.quant.stored is not None:
            return loading.config_dtype(self.base_config)
        return loading.stored_dtype(self.base_dir, self.base_config)

    @functools.cached_property
    def base_numel(self) -> int | None:
        """How many floating-point values the base stores (from safetensors headers; None for .bin)."""
        return loading.floating_numel(self.base_dir)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        requested = self.request.torch_dtype
        return requested if requested is not None else self.stored_dtype

    def adapters_report(self, ledgers: list[dict] | None = None) -> list[dict]:
        """The adapters as the report lists them (with their weights when combined, and each one's ledger when a
        combination check made them)."""
        weights = self.combination.weights if self.combination else [None] * len(self.sources)
        rows = [s.report(w) for s, w in zip(self.sources, weights, strict=True)]
        for row, ledger in zip(rows, ledgers or [], strict=False):
            row["ledger"] = ledger
        return rows
