"""Several adapters into one with PEFT's add_weighted_adapter, checked against what the combination means before
anything is merged: the combined adapter is then merged like any single adapter."""

from __future__ import annotations

import inspect
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from safe_merge.compat.adapter_files import load_adapter
from safe_merge.errors import BadInput
from safe_merge.io import loading
from safe_merge.io.model_dir import TOKENIZER_FILES, tokenizer_source
from safe_merge.merger.job import Job
from safe_merge.merger.rules import rule
from safe_merge.merger.rules.combinable import refuse_changed_copies
from safe_merge.verifier.combination_types import Combination
from safe_merge.verifier.combined_adapter import CombinationCheck, check_combination
from safe_merge.verifier.layer_kinds import layer_kinds


def build_and_check(job: Job, adapter_dirs: list[Path], combined_dir: Path) -> tuple[list[str], CombinationCheck]:
    """Build the combined adapter (float32, whatever the output dtype) and check it against the sources."""
    combined_dir.mkdir()
    model = loading.load_model(job.base_dir, torch.float32)
    kinds = layer_kinds(model)
    base_params = {name: p.detach() for name, p in model.state_dict().items()}
    with rule("combinable"):  # the one refusal that needs the built base: saved copies of tied parameters
        refuse_changed_copies(job.adapter_files, base_params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        notes = combine(model, adapter_dirs, job.combination, combined_dir)
    del model
    _carry_tokenizer([s.path for s in job.sources], combined_dir)
    sources = [load_adapter(d) for d in adapter_dirs]
    combined = load_adapter(combined_dir)
    check = check_combination(sources, combined, job.combination, base_params, kinds, job.peft_release)
    return notes, check


def _carry_tokenizer(source_dirs: list[Path], combined_dir: Path) -> None:
    """The adapters' own tokenizer goes with the combination when they agree on it; the base's otherwise."""
    carrying = [d for d in source_dirs if tokenizer_source(d, d) is not None]
    if not carrying:
        return
    first = carrying[0]
    names = [n for n in TOKENIZER_FILES if (first / n).is_file()]
    for other in carrying[1:]:
        same = [n for n in TOKENIZER_FILES if (other / n).is_file()] == names and all(
            (first / n).read_bytes() == (other / n).read_bytes() for n in names
        )
        if not same:
            raise BadInput(
                f"the adapters carry different tokenizers ({first} and {other})",
                path=other,
                hint="combine adapters trained with the same tokenizer",
            )
    for name in names:
        shutil.copyfile(first / name, combined_dir / name)


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
