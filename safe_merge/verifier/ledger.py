"""The ledger: what became of every tensor in the adapter file, and what the merged model must therefore hold.

Every adapter tensor ends in exactly one row: merged (folded into a base weight), replaced (a saved copy of a
base parameter: modules_to_save, bias="all", a saved embedding; or saved rows of one: trainable tokens), skipped
with a reason, unmatched (nothing in the base model to put it on: the merge cannot be right) or unverified (a
feature this verifier cannot check yet, which makes the verdict "could not verify", never a pass).
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.keys import LORA_ROLES, Role, parse_key
from safe_merge.compat.scaling import scaling
from safe_merge.verifier import param_targets
from safe_merge.verifier.delta import LayerKind, ModuleLora


class Status(enum.Enum):
    MERGED = "merged"
    REPLACED = "replaced"
    SKIPPED = "skipped"
    UNMATCHED = "unmatched"
    UNVERIFIED = "unverified"


@dataclass(frozen=True)
class Entry:
    key: str
    status: Status
    param: str | None = None
    reason: str = ""


@dataclass
class Ledger:
    """The ledger rows plus what they imply: per-module LoRA tensors and replaced parameter values."""

    entries: list[Entry] = field(default_factory=list)
    modules: dict[str, ModuleLora] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    token_rows: dict[str, TokenRows] = field(default_factory=dict)  # parameter -> rows trainable tokens replace

    def tie_token_rows(self, groups: list[list[str]]) -> None:
        """Trainable tokens on a tied embedding replace the rows of every parameter that shares it (PEFT ties the
        token adapter of the output embedding to the input one's)."""
        for names in groups:
            rows = next((self.token_rows[n] for n in names if n in self.token_rows), None)
            if rows is not None:
                for name in names:
                    self.token_rows.setdefault(name, rows)

    def by_status(self, status: Status) -> list[Entry]:
        return [e for e in self.entries if e.status is status]

    def summary(self) -> dict:
        """Counts per status, plus the unmatched / unverified / skipped rows spelled out (they need reading)."""
        out: dict = {s.value: len(self.by_status(s)) for s in Status}
        for status in (Status.UNMATCHED, Status.UNVERIFIED, Status.SKIPPED):
            rows = self.by_status(status)
            if rows:
                out[f"{status.value}_keys"] = [{"key": e.key, "reason": e.reason} for e in rows]
        return out


@dataclass(frozen=True)
class TokenRows:
    """Rows of an embedding that trainable tokens replace: the merged row ``indices[i]`` is ``values[i]``."""

    indices: torch.Tensor  # int64
    values: torch.Tensor


_A = {LayerKind.EMBEDDING: Role.EMBEDDING_A}
_B = {LayerKind.EMBEDDING: Role.EMBEDDING_B}


def build_ledger(
    adapter: AdapterFiles,
    base_params: Mapping[str, torch.Tensor],
    kinds: Mapping[str, LayerKind],
    compute_dtype: torch.dtype = torch.float32,
    precision: torch.dtype | None = torch.float64,
) -> Ledger:
    """Account for every adapter tensor against the base model's parameters and targetable module kinds.
    ``compute_dtype``: the precision the merging PEFT held the LoRA factors in. ``precision``: the dtype the
    ledger's tensors are held in (None keeps them as stored, for callers that widen one module at a time)."""
    ledger = Ledger()

    def held(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if precision is None else tensor.to(precision)

    by_module: dict[str, dict[Role, str]] = defaultdict(dict)
    for key in adapter.tensors:
        parsed = parse_key(key)
        if parsed is None:
            ledger.entries.append(Entry(key, Status.UNMATCHED, reason="not under PEFT's 'base_model.model.' prefix"))
        elif parsed.role in (Role.PARAM, Role.BASE_LAYER_PARAM):
            if parsed.param in base_params:
                ledger.entries.append(Entry(key, Status.REPLACED, parsed.param, "saved copy of a base parameter"))
                ledger.replacements[parsed.param] = held(adapter.tensors[key])
            else:
                ledger.entries.append(Entry(key, Status.UNMATCHED, parsed.param, "no such parameter in the base"))
        elif parsed.role is Role.ORIGINAL_COPY:
            ledger.entries.append(
                Entry(
                    key,
                    Status.SKIPPED,
                    parsed.param,
                    _original_copy_reason(key, parsed.param, adapter, base_params),
                )
            )
        elif parsed.role is Role.TOKEN_DELTA:
            values = adapter.tensors[key]
            indices, problem = _token_indices(adapter.config, parsed.module, values, base_params.get(parsed.param))
            if problem:
                ledger.entries.append(Entry(key, Status.UNMATCHED, parsed.param, problem))
            else:
                reason = f"rows {indices[:8]}{' …' if len(indices) > 8 else ''} of the embedding (trainable tokens)"
                ledger.entries.append(Entry(key, Status.REPLACED, parsed.param, reason))
                ledger.token_rows[parsed.param] = TokenRows(torch.tensor(indices, dtype=torch.int64), held(values))
        else:
            by_module[parsed.module][parsed.role] = key

    on_params = param_targets.resolve(by_module, adapter.tensors, adapter.config, base_params, kinds)
    for module, roles in by_module.items():
        if module in on_params:
            _add_param_lora(ledger, module, roles, on_params[module], adapter, base_params, kinds, held, compute_dtype)
            continue
        kind = kinds.get(module) or _parameter_as_linear(adapter.config, f"{module}.weight", base_params)
        reason = _module_problem(module, roles, kind, base_params)
        if reason:
            for key in roles.values():
                ledger.entries.append(Entry(key, Status.UNMATCHED, f"{module}.weight", reason))
            continue
        assert kind is not None
        a = held(adapter.tensors[roles[_A.get(kind, Role.LORA_A)]])
        b = held(adapter.tensors[roles[_B.get(kind, Role.LORA_B)]])
        magnitude = roles.get(Role.MAGNITUDE)
        bias = roles.get(Role.LORA_B_BIAS)
        ledger.modules[module] = ModuleLora(
            module=module,
            kind=kind,
            a=a,
            b=b,
            scale=scaling(adapter.config, module, int(a.shape[0])),
            magnitude=held(adapter.tensors[magnitude]) if magnitude else None,
            bias=held(adapter.tensors[bias]) if bias else None,
            compute_dtype=compute_dtype,
        )
        for role, key in roles.items():
            param = f"{module}.bias" if role is Role.LORA_B_BIAS else f"{module}.weight"
            ledger.entries.append(Entry(key, Status.MERGED, param))
    return ledger


def _add_param_lora(ledger, module, roles, resolved, adapter, base_params, kinds, held, compute_dtype) -> None:
    """A LoRA on a parameter (target_parameters): merged into that parameter, or unmatched with the reason."""
    param, problem = resolved
    stray = [r.value for r in roles if r not in (Role.LORA_A, Role.LORA_B)]
    if stray and not problem:
        problem = f"tensors {stray} do not fit a LoRA on a parameter"
    if param is None or problem:
        for key in roles.values():
            ledger.entries.append(Entry(key, Status.UNMATCHED, param, problem))
        return
    a, b = held(adapter.tensors[roles[Role.LORA_A]]), held(adapter.tensors[roles[Role.LORA_B]])
    experts = int(param_targets.shape_of(base_params, param)[0])
    ledger.modules[param] = ModuleLora(
        module=param,
        kind=kinds.get(param, LayerKind.EXPERTS),
        a=a,
        b=b,
        scale=scaling(adapter.config, param, int(a.shape[0]) // experts),  # PEFT looks patterns up by the parameter
        compute_dtype=compute_dtype,
        param=param,
        num_experts=experts,
    )
    for key in roles.values():
        ledger.entries.append(Entry(key, Status.MERGED, param))


def _parameter_as_linear(config: Mapping, name: str, base_params: Mapping) -> LayerKind | None:
    """A 2-D weight targeted as a parameter (target_parameters) of a module that is no Linear (transformers 5's MoE
    routers): PEFT merges it as a Linear weight [out, in]."""
    targets = [t for t in config.get("target_parameters") or [] if isinstance(t, str)]
    if name not in base_params or not any(name == t or name.endswith(f".{t}") for t in targets):
        return None
    return LayerKind.LINEAR if len(param_targets.shape_of(base_params, name)) == 2 else None


def _token_indices(
    config: Mapping, module: str, values: torch.Tensor, weight: torch.Tensor | None
) -> tuple[list[int], str]:
    """The embedding rows a trainable-tokens delta replaces, from ``trainable_token_indices`` (a list for the
    input embedding, or module name → list), and why they cannot be placed ('' when they can)."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        found = [v for k, v in spec.items() if module == k or module.endswith(f".{k}")]
        spec = found[0] if len(found) == 1 else None
    if not isinstance(spec, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return [], f"trainable_token_indices names no index list for {module!r}"
    if weight is None or weight.dim() != 2:
        return [], f"the base model has no embedding {module!r}"
    if tuple(values.shape) != (len(spec), weight.shape[1]):
        return [], f"{tuple(values.shape)} rows do not fit {len(spec)} indices of a {tuple(weight.shape)} embedding"
    if any(not 0 <= i < weight.shape[0] for i in spec):
        return [], f"an index of trainable_token_indices lies outside the {weight.shape[0]} rows of {module!r}"
    return list(spec), ""


def _module_problem(
    module: str, roles: Mapping[Role, str], kind: LayerKind | None, base_params: Mapping[str, torch.Tensor]
) -> str:
    """Why a module's LoRA tensors cannot be put on the base, or '' when they can."""
    if f"{module}.weight" not in base_params:
        return f"the base model has no module {module!r} with a weight"
    if kind is None:
        return f"{module!r} is not a layer type LoRA merges into (Linear, Conv1D, Conv, Embedding)"
    want_a, want_b = _A.get(kind, Role.LORA_A), _B.get(kind, Role.LORA_B)
    missing = [r.value for r in (want_a, want_b) if r not in roles]
    if missing:
        return f"incomplete LoRA pair: {', '.join(missing)} missing"
    stray = [r.value for r in roles if r in LORA_ROLES and r not in (want_a, want_b)]
    if stray:
        return f"tensors {stray} do not fit a {kind.value} layer"
    if Role.LORA_B_BIAS in roles and f"{module}.bias" not in base_params:
        return "lora_B has a bias but the base layer has none"
    return ""


def _original_copy_reason(key: str, param: str | None, adapter: AdapterFiles, base: Mapping[str, torch.Tensor]) -> str:
    """PEFT's wrapper keeps the original module next to the saved copy; only the copy reaches the merged model."""
    why = "PEFT's spare copy of the original module; the merged model uses the saved copy"
    if param not in base:
        return why
    diff = float((adapter.tensors[key].to(torch.float64) - base[param].to(torch.float64)).abs().max())
    return f"{why} (equals the base)" if diff == 0 else f"{why} (differs from the base by up to {diff:.3g})"
