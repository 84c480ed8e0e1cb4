"""The PEFT backend: PeftModel.from_pretrained, then merge_and_unload, feature-detected across releases."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.keys import targeted_modules
from safe_merge.merger import loading
from safe_merge.merger.tying import record_broken_ties, shared_groups, untie_targets


def merge_and_unload(peft_model: nn.Module) -> nn.Module:
    """merge_and_unload with safe_merge (a NaN check) where the installed PEFT has it (0.6+)."""
    kwargs = {}
    if "safe_merge" in inspect.signature(peft_model.merge_and_unload).parameters:
        kwargs["safe_merge"] = True
    return peft_model.merge_and_unload(**kwargs)


def merge(base_dir: Path, adapter: AdapterFiles, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    """Merge one adapter into the base saved in ``base_dir``, loaded in ``dtype``."""
    return merge_model(loading.load_model(base_dir, dtype), adapter)


def merge_model(model: nn.Module, adapter: AdapterFiles) -> tuple[nn.Module, list[str]]:
    """Merge one adapter into a loaded base model (consumed); returns the plain model and notes for the report."""
    notes = []
    groups = shared_groups(model)
    untied = untie_targets(model, targeted_modules(adapter.tensors))
    if untied:
        notes.append(
            f"untied {', '.join(untied)} from a LoRA-targeted weight, so the merged model keeps the adapter's "
            "meaning (the merge would otherwise change the tied side too)"
        )
    peft_model = loading.load_peft(model, adapter.path)
    merged = merge_and_unload(peft_model).eval()
    broken = record_broken_ties(merged, groups)
    if broken:
        notes.append(f"{', '.join(broken)} now hold their own weights (a saved module replaced a tied side)")
    return merged, notes
