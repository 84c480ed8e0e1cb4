"""Untie shared weights before a merge touches one of them.

With tied embeddings (GPT-2, many small Llamas) the input embedding and the LM head share one tensor. A LoRA on
the embedding changes only the lookup in the unmerged model; merging it into the shared tensor would change the
head too (measured: logits off by 275 on a tiny GPT-2). The merged model keeps the unmerged model's meaning only
when the sharing is broken first, so the untouched side keeps the base weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from safe_merge.verifier.ties import shared_groups


def untie_targets(model: nn.Module, targeted_modules: Iterable[str]) -> list[str]:
    """Give each parameter that shares storage with a targeted module's weight its own copy; returns their names."""
    targeted = {f"{m}.weight" for m in targeted_modules}
    untied = []
    for names in shared_groups(model):
        if not targeted.intersection(names):
            continue
        keep = next(n for n in names if n in targeted)
        for name in names:
            if name == keep:
                continue
            owner_path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_path)
            setattr(owner, leaf, nn.Parameter(getattr(owner, leaf).detach().clone(), requires_grad=False))
            untied.append(name)
    if untied:
        _record_untied(model)
    return untied


def untie_replicated_layers(model: nn.Module) -> int:
    """Give each layer of a stack PEFT deepened with layer_replication its own copy of the weights it shares with
    another layer, so that each layer's delta lands on that layer alone (PEFT's own merge adds them all into the
    shared tensor). Returns how many parameters were copied; other ties (embeddings) are left as they are."""
    copied = 0
    for names in shared_groups(model):
        prefixes = {_LAYER_INDEX.sub(".#.", n) for n in names}
        if len(prefixes) != 1 or not all(_LAYER_INDEX.search(n) for n in names):
            continue  # not the same parameter of several layers
        for name in names[1:]:
            owner_path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_path)
            setattr(owner, leaf, nn.Parameter(getattr(owner, leaf).detach().clone(), requires_grad=False))
            copied += 1
    return copied


_LAYER_INDEX = re.compile(r"\.\d+\.")


def record_broken_ties(model: nn.Module, groups_before: list[list[str]]) -> list[str]:
    """After a merge, find tied groups that no longer share one tensor (a saved module replaced one side) and
    record that in the config; returns the names now standing on their own."""
    params = dict(model.named_parameters(remove_duplicate=False))
    broken = []
    for names in groups_before:
        present = [n for n in names if n in params]
        if len({id(params[n]) for n in present}) > 1:
            broken.extend(present[1:])
    if broken:
        _record_untied(model)
    return broken


def _record_untied(model: nn.Module) -> None:
    """Tell the config, so that saving and reloading do not tie the weights again."""
    config = getattr(model, "config", None)
    if config is None:
        return
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        text.tie_word_embeddings = False
