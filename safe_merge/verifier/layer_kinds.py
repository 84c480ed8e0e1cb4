"""Which modules of a loaded model LoRA can merge into, and in which weight layout."""

from __future__ import annotations

from torch import nn

from safe_merge.compat.expert_stacks import taken_as_in_out
from safe_merge.io.loading import installed_peft
from safe_merge.verifier.delta import LayerKind


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The layout of a module's weight, or None when LoRA's merge does not apply to it.

    transformers' Conv1D is recognised by name: its import path moved between releases, and the class is only
    ever a Linear with the weight stored transposed.
    """
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return LayerKind.LINEAR_FIFO
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, nn.Embedding):
        return LayerKind.EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1:
        return LayerKind.CONV
    return None


def layer_kinds(model: nn.Module) -> dict[str, LayerKind]:
    """Map every mergeable module path (as PEFT writes it into adapter keys) to its layout, and every 3-D
    parameter (MoE experts, which LoRA reaches through target_parameters) by its own name."""
    kinds = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None:
            kinds[name] = kind
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                # transformers marks expert stacks stored [E, in, out] (gpt-oss); the rest are [E, out, in]
                kinds[f"{name}.{param_name}"] = expert_kind(bool(getattr(module, "is_transposed", False)))
    return kinds


def expert_kind(transposed: bool) -> LayerKind:
    """How the installed PEFT lays a LoRA on an expert stack out (``transposed``: the model stores it [E, in, out])."""
    return LayerKind.EXPERTS_T if taken_as_in_out(installed_peft(), transposed) else LayerKind.EXPERTS
