"""Which base parameter each LoRA on a parameter merges into (target_parameters, PEFT 0.17+: MoE expert stacks).

PEFT wraps the module that owns a targeted parameter; a second targeted parameter of the same module wraps the
wrapper, so the adapter's keys name the module once per parameter, ``experts.lora_A`` and
``experts.base_layer.lora_A``, never the parameter. The shapes tell which is which: A is [E·r, in] and B is
[out, E·r] for a parameter [E, out, in] ([E, in, out] where the model stores experts transposed). Where shapes
fit several parameters, the nesting does: PEFT wraps a module's parameters in the order the module registers
them, the first one innermost (0.18+, which sorts its targets; 0.17 matched them in set order). Where neither
tells, the tensors are unmatched, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from safe_merge.compat.keys import Role
from safe_merge.verifier.delta import LayerKind

WRAPPER = ".base_layer"


def owner(module: str) -> tuple[str, int]:
    """The wrapped module's path and how many wrappers lie outside this one (0: the outermost)."""
    depth = 0
    while module.endswith(WRAPPER):
        module, depth = module[: -len(WRAPPER)], depth + 1
    return module, depth


def shape_of(params: Mapping, name: str) -> tuple[int, ...]:
    """A parameter's shape, without reading it where the mapping can tell (the stream backend's view of a
    checkpoint)."""
    shape = getattr(params, "shape_of", None)
    return tuple(shape(name)) if shape is not None else tuple(params[name].shape)


def fits(shape: tuple[int, ...], kind: LayerKind | None, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether A and B make a delta of this parameter's shape in this layout."""
    if len(shape) != 3 or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] % shape[0]:
        return False
    out_in = (b.shape[0], a.shape[1])
    return tuple(shape[1:]) == (out_in[::-1] if kind is LayerKind.EXPERTS_T else out_in)


def resolve(
    by_module: Mapping[str, Mapping[Role, str]],
    tensors: Mapping[str, torch.Tensor],
    config: Mapping,
    base_params: Mapping[str, torch.Tensor],
    kinds: Mapping[str, LayerKind],
) -> dict[str, tuple[str | None, str]]:
    """For each module path in the adapter that carries LoRA on a parameter: (the parameter, '') or (None, why)."""
    targets = [t for t in config.get("target_parameters") or [] if isinstance(t, str)]
    if not targets:
        return {}
    wrappers: dict[str, dict[int, str]] = {}
    for module, roles in by_module.items():
        if Role.LORA_A not in roles or Role.LORA_B not in roles or f"{module}.weight" in base_params:
            continue
        path, depth = owner(module)
        wrappers.setdefault(path, {})[depth] = module
    out: dict[str, tuple[str | None, str]] = {}
    for path, by_depth in wrappers.items():
        # the module's targeted parameters, in the order the model registers them
        params = [
            name
            for name in base_params
            if name.rpartition(".")[0] == path and any(name == t or name.endswith(f".{t}") for t in targets)
        ]
        for depth, module in by_depth.items():
            roles = by_module[module]
            a, b = tensors[roles[Role.LORA_A]], tensors[roles[Role.LORA_B]]
            fitting = [p for p in params if fits(shape_of(base_params, p), kinds.get(p), a, b)]
            if len(fitting) > 1 and len(by_depth) == len(params):
                fitting = [params[len(params) - 1 - depth]]  # the nesting: the first registered innermost
            if len(fitting) == 1:
                out[module] = (fitting[0], "")
            elif not fitting:
                out[module] = (
                    None,
                    f"no targeted parameter of {path!r} fits lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}",
                )
            else:
                which = ", ".join(fitting)
                why = f"lora_A/lora_B fit several parameters of {path!r} ({which}); the nesting cannot tell which"
                out[module] = (None, why)
    return out
