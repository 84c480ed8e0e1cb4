"""The PEFT backend: load the base with transformers, PeftModel.from_pretrained, merge_and_unload (feature-detected
across releases), written by the project's shard writer; then the whole-model verifier on what was written."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from safe_merge.compat import heads
from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.history import History
from safe_merge.compat.keys import targeted_modules
from safe_merge.io import loading
from safe_merge.io.model_dir import DEFAULT_SHARD_SIZE, write_model
from safe_merge.merger.backends.base import WEIGHT_CHECKS
from safe_merge.merger.job import Job
from safe_merge.merger.tying import record_broken_ties, untie_replicated_layers, untie_targets
from safe_merge.verifier.outputs import float64_copy_fits
from safe_merge.verifier.replication import expected_config_changes, layer_sources
from safe_merge.verifier.ties import shared_groups
from safe_merge.verifier.verdict import Verification, verify_dirs


def merge_and_unload(peft_model: nn.Module, rounding: str = "default") -> nn.Module:
    """merge_and_unload() as tutorials call it (rounding "default": the delta added in its own dtype, one
    rounding), or with safe_merge=True ("peft-safe") where the installed PEFT has it (0.6+) and it works.

    0.6.0-0.8.1 crash in safe_merge on Embedding and Conv2d layers; there the default path runs. NaN and Inf are
    the verifier's to find either way (its finiteness check names the tensor).
    """
    kwargs = {}
    has_it = "safe_merge" in inspect.signature(peft_model.merge_and_unload).parameters
    crashes = History.load().affected("safe_merge_copy_crashes", loading.installed_peft())
    if rounding == "peft-safe" and has_it and not crashes:
        kwargs["safe_merge"] = True
    return peft_model.merge_and_unload(**kwargs)


def merge(
    base_dir: Path, adapter: AdapterFiles, dtype: torch.dtype, rounding: str = "default"
) -> tuple[nn.Module, list[str]]:
    """Merge one adapter into the base saved in ``base_dir``, loaded in ``dtype``."""
    return merge_model(loading.load_model(base_dir, dtype, **heads.load_kwargs(adapter)), adapter, rounding)


def merge_model(model: nn.Module, adapter: AdapterFiles, rounding: str = "default") -> tuple[nn.Module, list[str]]:
    """Merge one adapter into a loaded base model (consumed); returns the plain model and notes for the report."""
    notes = []
    groups = shared_groups(model)
    untied = untie_targets(model, targeted_modules(adapter.tensors))
    if untied:
        notes.append(
            f"untied {', '.join(untied)} from a LoRA-targeted weight, so the merged model keeps the adapter's "
            "meaning (the merge would otherwise change the tied side too)"
        )
    sources = layer_sources(adapter.config)
    deeper = expected_config_changes(model.config.to_dict(), sources) if sources is not None else {}
    peft_model = loading.load_peft(model, adapter.path)
    if sources is not None:
        copied = untie_replicated_layers(peft_model)
        for key, value in deeper.items():  # PEFT sets the depth; per-layer lists follow it here
            setattr(peft_model.get_base_model().config, key, value)
        notes.append(
            f"layer_replication: {len(sources)} layers written, each with its own weights ({copied} shared tensors "
            "copied first; PEFT's own merge adds every copy's delta into the one tensor they share)"
        )
    merged = merge_and_unload(peft_model, rounding).eval()
    broken = record_broken_ties(merged, groups)
    if broken:
        notes.append(f"{', '.join(broken)} now hold their own weights (a saved module replaced a tied side)")
    return merged, notes


class PeftBackend:
    """merge_and_unload on the loaded base, for any architecture transformers and PEFT load."""

    name = "peft"
    chosen_because = "the stream backend cannot take it"

    def __init__(self, job: Job, adapter: AdapterFiles):
        self.job, self.adapter = job, adapter
        self.model: nn.Module | None = None
        self.notes: list[str] = []

    @classmethod
    def offer(cls, job: Job, adapter: AdapterFiles) -> PeftBackend | list[str]:
        if job.quant is not None:
            return [f"the base is quantized ({job.quant.describe()}): the quantized backend merges it"]
        return cls(job, adapter)

    def builds_models(self) -> bool:
        return True

    def merge(self) -> None:
        self.model, self.notes = merge(self.job.base_dir, self.adapter, self.job.dtype, self.job.request.rounding)

    def write(self, stage: Path) -> list[str]:
        assert self.model is not None, "merge() first"
        size = self.job.request.max_shard_size or DEFAULT_SHARD_SIZE
        files, notes = self.write_files(stage, size)
        self.notes += notes
        self.model = None  # the verifier loads what was written; the merged model in memory is not needed
        return files

    def write_files(self, stage: Path, size: str) -> tuple[list[str], list[str]]:
        """The merged model into ``stage``: the file names, and notes for the report."""
        return write_model(self.model, stage, self.job.base_dir, self.adapter.path, size)

    def verify(self, stage: Path) -> Verification:
        return verify_dirs(self.job.base_dir, self.adapter.path, stage)

    def report(self) -> dict:
        return {}

    def estimate_peak_memory(self, free: int) -> dict:
        """Verification holds the merged model, the base as stored and the reference in the merged dtype at
        once, plus a float64 twin of the reference when it fits in half the free memory (the noise measurement)."""
        numel = self.job.base_numel
        if not numel:
            return {"bytes": None, "float64_noise_twin": False}
        native = self.job.stored_dtype
        twin = numel * 8 if float64_copy_fits(numel, free) else 0
        peak = numel * (2 * _itemsize(self.job.dtype) + _itemsize(native)) + twin
        return {"bytes": peak, "float64_noise_twin": bool(twin)}

    def checks(self) -> list[str]:
        return [WEIGHT_CHECKS]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()
