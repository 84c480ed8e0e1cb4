"""Tied weights of a built model: parameters that share one tensor (an input embedding and the LM head of many
small causal LMs). The merge must not change both through one; the verifier must expect both to move when the
adapter's meaning is that they do (trainable tokens on a tied embedding)."""

from __future__ import annotations

from torch import nn


def shared_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that share one tensor (tied weights), one list per shared tensor."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
