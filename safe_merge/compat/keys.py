"""The grammar of tensor keys in a LoRA adapter file.

On disk every key is ``base_model.model.<module path>.<role suffix>``; the adapter name PEFT uses in memory is
never written. Parsing a key once, here, keeps the ledger and the delta code free of string surgery.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PREFIX = "base_model.model."


class Role(enum.Enum):
    LORA_A = "lora_A"
    LORA_B = "lora_B"
    LORA_B_BIAS = "lora_B.bias"
    EMBEDDING_A = "lora_embedding_A"
    EMBEDDING_B = "lora_embedding_B"
    MAGNITUDE = "lora_magnitude_vector"
    BASE_LAYER_PARAM = "base_layer"  # a base parameter of a targeted module, saved in full (bias="all", embeddings)
    TOKEN_DELTA = "trainable_tokens_delta"
    PARAM = "param"  # a full parameter of an untargeted module (modules_to_save, bias="all")
    ORIGINAL_COPY = "original_module"  # PEFT's spare copy of a saved module's original parameter


# Longest suffixes first, so ".lora_B.bias" is never read as a plain ".bias".
_SUFFIXES: tuple[tuple[str, Role], ...] = (
    (".lora_magnitude_vector.weight", Role.MAGNITUDE),
    (".lora_magnitude_vector", Role.MAGNITUDE),
    (".token_adapter.trainable_tokens_delta", Role.TOKEN_DELTA),
    (".lora_embedding_A", Role.EMBEDDING_A),
    (".lora_embedding_B", Role.EMBEDDING_B),
    (".lora_A.weight", Role.LORA_A),
    (".lora_B.weight", Role.LORA_B),
    (".lora_B.bias", Role.LORA_B_BIAS),
)

LORA_ROLES = frozenset({Role.LORA_A, Role.LORA_B, Role.EMBEDDING_A, Role.EMBEDDING_B})


@dataclass(frozen=True)
class AdapterKey:
    """One parsed adapter key.

    ``module`` is the module path relative to the top model (``model.layers.0.self_attn.q_proj``); ``param`` is
    the base-model parameter the tensor stands for or lands on (``…q_proj.weight``), when there is one.
    """

    key: str
    module: str
    role: Role
    param: str | None


def parse_key(key: str) -> AdapterKey | None:
    """Parse an on-disk adapter key; None when it does not start with PEFT's ``base_model.model.`` prefix."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX) :]
    for suffix, role in _SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            param = f"{module}.bias" if role is Role.LORA_B_BIAS else f"{module}.weight"
            return AdapterKey(key, module, role, param)
    for leaf in ("weight", "bias"):
        suffix = f".base_layer.{leaf}"
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            return AdapterKey(key, module, Role.BASE_LAYER_PARAM, f"{module}.{leaf}")
    # bias="all" saves every bias by name, wrapper paths of modules_to_save included
    module, _, leaf = rest.rpartition(".")
    for wrapper, role in ((".modules_to_save", Role.PARAM), (".original_module", Role.ORIGINAL_COPY)):
        if module.endswith(wrapper):
            module = module[: -len(wrapper)]
            return AdapterKey(key, module, role, f"{module}.{leaf}")
    return AdapterKey(key, module, Role.PARAM, rest)


def targeted_modules(keys) -> set[str]:
    """Module paths that carry LoRA tensors, from an adapter file's keys."""
    out = set()
    for key in keys:
        parsed = parse_key(key)
        if parsed is not None and parsed.role in LORA_ROLES:
            out.add(parsed.module)
    return out
