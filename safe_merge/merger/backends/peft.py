"""The PEFT backend: PeftModel.from_pretrained, then merge_and_unload, feature-detected across releases."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.history import History
from safe_merge.compat.keys import targeted_modules
from safe_merge.io import loading
from safe_merge.merger.rules.combinable import Combination
from safe_merge.merger.tying import record_broken_ties, shared_groups, untie_targets


def merge_and_unload(peft_model: nn.Module) -> nn.Module:
    """merge_and_unload with safe_merge (a NaN check) where the installed PEFT has it (0.6+) and it works.

    0.6.0-0.8.1 crash in it on Embedding and Conv2d layers; there the verifier's own finiteness check stands alone.
    """
    kwargs = {}
    has_it = "safe_merge" in inspect.signature(peft_model.merge_and_unload).parameters
    if has_it and not History.load().affected("safe_merge_copy_crashes", loading.installed_peft()):
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


COMBINED = "default"  # the combined adapter's name: save_pretrained then writes it at the top of the directory


def combine(model: nn.Module, adapter_dirs: list[Path], combination: Combination, out_dir: Path) -> list[str]:
    """Load every adapter onto ``model`` (consumed), run add_weighted_adapter, and save the combined adapter into
    ``out_dir``; returns notes for the report.

    The combined factors already carry each source's weight and scale, so the combined adapter's own scaling
    must be 1. Releases that build it with the first source's use_rslora (PEFT 0.21.2 among them) scale it by
    sqrt(r) instead; that is set right here, and said in the notes.
    """
    names = [f"source_{i}" for i in range(len(adapter_dirs))]
    peft_model = loading.load_peft(model, adapter_dirs[0], adapter_name=names[0])
    for name, adapter_dir in zip(names[1:], adapter_dirs[1:], strict=True):
        loading.load_extra_adapter(peft_model, adapter_dir, name)
    options = {
        "combination_type": combination.type,
        "density": combination.density,
        "majority_sign_method": combination.majority_sign,
        "svd_rank": combination.svd_rank,
    }
    accepted = inspect.signature(peft_model.add_weighted_adapter).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    with torch.no_grad():
        peft_model.add_weighted_adapter(names, list(combination.weights), COMBINED, **kwargs)
    notes = _unit_scaling(peft_model)
    for name, param in peft_model.named_parameters():
        if f".{COMBINED}." in name and not param.data.is_contiguous():  # some releases leave SVD slices strided
            param.data = param.data.contiguous()
    peft_model.save_pretrained(str(out_dir), selected_adapters=[COMBINED], safe_serialization=True)
    return notes


def _unit_scaling(peft_model: nn.Module) -> list[str]:
    config = peft_model.peft_config[COMBINED]
    wrong = set()
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and COMBINED in scaling and scaling[COMBINED] != 1.0:
            wrong.add(float(scaling[COMBINED]))
            scaling[COMBINED] = 1.0
    if not wrong:
        return []
    inherited = " (it inherited use_rslora from the first adapter)" if getattr(config, "use_rslora", False) else ""
    if hasattr(config, "use_rslora"):
        config.use_rslora = False
    config.lora_alpha = config.r
    return [
        f"PEFT built the combined adapter with scaling {', '.join(f'{s:.4g}' for s in sorted(wrong))}{inherited}; "
        "set to 1, since the combined factors already carry each adapter's weight and scale"
    ]
