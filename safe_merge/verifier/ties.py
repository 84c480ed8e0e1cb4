"""Tied weights of a built model: parameters that share one tensor (an input embedding and the LM head of many
small causal LMs). The merge must not change both through one; the verifier must expect both to move when the
adapter's meaning is that they do (trainable tokens on a tied embedding)."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def shared_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that share one tensor (tied weights), one list per shared tensor."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def tied_by_config(model_dir: Path) -> list[list[str]] | None:
    """The tied groups of the model a directory's config.json builds, built on the meta device (no weights are
    read or allocated); None when its class cannot be built there."""
    import torch

    from safe_merge.io import loading

    try:
        config = loading.read_model_config(model_dir)
        cls = loading.model_class(config)
        with torch.device("meta"):
            model = cls(config)
            # transformers 5.0 skips the tie when it builds on the meta device (measured on GPT-2); tying
            # again is what loading does, and is harmless where the tie is already there
            if callable(getattr(model, "tie_weights", None)):
                model.tie_weights()
    except Exception:  # a class that cannot be built without weights: the output check is then the tie's witness
        return None
    return shared_groups(model)
