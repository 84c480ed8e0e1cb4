"""The one verifier: ledger, weight space, output space, and a verdict. Tests, the CLI and later the matrix and
fingerprints all call it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from packaging.version import Version
from torch import nn

from safe_merge.compat import heads
from safe_merge.compat.adapter_files import AdapterFiles, load_adapter
from safe_merge.compat.base_rewrites import base_rewrites
from safe_merge.compat.history import History
from safe_merge.errors import EXIT_COULD_NOT_VERIFY, EXIT_FAILED, EXIT_OK, BadInput
from safe_merge.io import loading
from safe_merge.io.checkpoint import Checkpoint
from safe_merge.verifier.accounting import accounting_problems
from safe_merge.verifier.checkpoint_files import file_problems
from safe_merge.verifier.combined_adapter import CombinationCheck
from safe_merge.verifier.delta import LayerKind
from safe_merge.verifier.layer_kinds import layer_kinds
from safe_merge.verifier.ledger import Ledger, Status, build_ledger
from safe_merge.verifier.outputs import OutputCheck, check_outputs
from safe_merge.verifier.probes import probe_inputs
from safe_merge.verifier.replication import expand, expected_config_changes, layer_prefix, layer_sources
from safe_merge.verifier.ties import shared_groups
from safe_merge.verifier.weights import WeightCheck, check_weights

PASSED, FAILED, COULD_NOT_VERIFY = "passed", "failed", "could_not_verify"


@dataclass
class Verification:
    ledger: Ledger
    weights: WeightCheck
    outputs: OutputCheck
    warnings: list[str] = field(default_factory=list)
    combination: CombinationCheck | None = None  # several adapters: the combined adapter against its sources
    quantized: object | None = None  # a quantized base: quantized.QuantCheck (its budgets, measured parts)
    config: list[str] = field(default_factory=list)  # config.json fields the merge should not have changed

    @property
    def problems(self) -> list[str]:
        """What makes the merge wrong, one line each, tensors named."""
        out = [f"unmatched adapter tensor {e.key}: {e.reason}" for e in self.ledger.by_status(Status.UNMATCHED)]
        if self.combination is not None:
            out += [f"combination: {f}" for f in self.combination.failures]
        if self.quantized is not None:
            out += [f"quantized: {f}" for f in self.quantized.failures]
        out += self.weights.failures
        out += self.config
        if self.outputs.ran and not self.outputs.passed:
            detail = self.outputs.reason or f"max |diff| {self.outputs.max_abs:.3g} > tol {self.outputs.tol:.3g}"
            out.append(f"outputs differ from the unmerged PeftModel: {detail}")
        return out

    @property
    def gaps(self) -> list[str]:
        """What could not be checked; any gap turns a pass into 'could not verify'."""
        out = [f"{e.key}: {e.reason}" for e in self.ledger.by_status(Status.UNVERIFIED)]
        if self.combination is not None:
            out += [f"combination: {g}" for g in self.combination.gaps]
        if not self.outputs.ran and not self.outputs.optional:
            out.append(f"output check did not run: {self.outputs.reason}")
        return out

    @property
    def status(self) -> str:
        if self.problems:
            return FAILED
        return COULD_NOT_VERIFY if self.gaps else PASSED

    @property
    def exit_code(self) -> int:
        return {PASSED: EXIT_OK, FAILED: EXIT_FAILED, COULD_NOT_VERIFY: EXIT_COULD_NOT_VERIFY}[self.status]

    def report(self) -> dict:
        return {
            "status": self.status,
            "ledger": self.ledger.summary(),
            "verification": {
                "weights": self.weights.report(),
                "outputs": self.outputs.report(),
                "config": {"changed_fields": len(self.config)},
                **({"combination": self.combination.report()} if self.combination is not None else {}),
                **({"quantized": self.quantized.report()} if self.quantized is not None else {}),
            },
            "problems": self.problems,
            "gaps": self.gaps,
            "warnings": self.all_warnings(),
        }

    def all_warnings(self) -> list[str]:
        out = list(self.warnings)
        if not self.outputs.ran and self.outputs.optional:
            out.append(f"the output check did not run ({self.outputs.reason}); the weights were checked one by one")
        if self.quantized is not None:
            out.append(self.quantized.warning())
        if self.weights.unresolvable:
            out.append(
                f"{len(self.weights.unresolvable)} merged tensors move by less than their dtype resolves "
                f"(first: {self.weights.unresolvable[0]}); a merge that skipped them would look the same"
            )
        if self.outputs.ran and not self.outputs.discriminating:
            understated = History.load().affected("disable_adapter_keeps_saved_modules", loading.installed_peft())
            out.append(
                f"the adapter moves the probe outputs by {self.outputs.effect:.3g}, within the output "
                f"tolerance {self.outputs.tol:.3g}: the output check cannot tell this merge from no merge"
                + (
                    " (the installed PEFT keeps saved modules on while disabled: their effect is not in that figure)"
                    if understated
                    else ""
                )
            )
        return out


def verify_models(
    adapter: AdapterFiles,
    base_params: Mapping[str, torch.Tensor],
    kinds: Mapping[str, LayerKind],
    merged: nn.Module,
    reference: nn.Module | None,
    inputs,
    *,
    merged_params: Mapping[str, torch.Tensor] | None = None,
    ties: list[list[str]] | None = None,
) -> Verification:
    """Verify an in-memory merged model.

    ``base_params`` is the base model's state dict taken before any PEFT wrapping; ``reference`` is the unmerged
    PeftModel with the adapter active, in the merged model's dtype (None skips the output check, which is a gap);
    ``ties`` the base's parameters that share one tensor.
    """
    params = merged_params if merged_params is not None else merged.state_dict()
    ledger = build_ledger(adapter, base_params, kinds, adapter_precision(next(merged.parameters()).dtype))
    ledger.tie_token_rows(ties or [])
    weights = check_weights(ledger, base_params, params)
    compared = {t.name for t in weights.tensors}
    weights.failures += accounting_problems(adapter.tensors, ledger, base_params, compared)
    if reference is None or inputs is None:
        reason = "no unmerged reference model" if reference is None else "no probe inputs for this model type"
        outputs = OutputCheck(False, reason=reason)
    else:
        dtype = next(merged.parameters()).dtype
        outputs = check_outputs(reference, merged, inputs, dtype)
    return Verification(ledger, weights, outputs)


def verify_dirs(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    tokenizer_from: Path | None = None,
    check_outputs: str = "always",
) -> Verification:
    """Verify a merged checkpoint on disk, whoever wrote it, against its base and adapter. ``tokenizer_from``: the
    adapter directory whose tokenizer the merged one should carry, when ``adapter_dir`` is a migrated copy;
    ``check_outputs`` "never" skips the output check (the models are loaded for the weights anyway, so "auto"
    runs it)."""
    adapter = load_adapter(adapter_dir)
    require_lora(adapter)
    require_unchanged_base(adapter)
    sources = layer_sources(adapter.config)
    head = heads.load_kwargs(adapter)
    loaded = _load_models(base_dir, adapter_dir, merged_dir, sources, head)
    result = verify_models(
        adapter,
        loaded.base_params,
        loaded.kinds,
        loaded.merged,
        None if check_outputs == "never" else loaded.reference,
        loaded.inputs,
        merged_params=loaded.merged.state_dict(),
        ties=loaded.ties,
    )
    if check_outputs == "never":
        result.outputs = OutputCheck(False, reason="not asked for (--check-outputs never)", optional=True)
    if loaded.missing:
        result.weights.failures.insert(0, f"missing from the merged checkpoint: {', '.join(loaded.missing[:5])}")
    stray = sorted(set(Checkpoint(merged_dir).tensors) - set(Checkpoint(base_dir).tensors) - set(loaded.base_params))
    if stray:  # the loaded model never sees a tensor it has no parameter for
        result.weights.failures.insert(0, f"not in the base model: {', '.join(stray[:5])} (in the merged files)")
    base_config = loading.read_config_json(base_dir).to_dict()
    expected = expected_config_changes(base_config, sources) if sources else {}
    if head:
        expected.update(heads.expected_config(base_config, loaded.base_class, head["num_labels"]))
    result.config = file_problems(base_dir, tokenizer_from or adapter_dir, merged_dir, expected)
    return result


def check_outputs_dirs(base_dir: Path, adapter_dir: Path, merged_dir: Path, twin: bool | None = None) -> OutputCheck:
    """The output-space check alone, for a merged checkpoint on disk (the stream backend checks weights itself);
    ``twin`` as check_outputs takes it."""
    loaded = _load_models(base_dir, adapter_dir, merged_dir, keep_base=False)
    if loaded.inputs is None:
        return OutputCheck(False, reason="no probe inputs for this model type")
    dtype = next(loaded.merged.parameters()).dtype
    return check_outputs(loaded.reference, loaded.merged, loaded.inputs, dtype, twin)


@dataclass
class _Loaded:
    merged: nn.Module
    reference: nn.Module
    base_params: Mapping[str, torch.Tensor]
    kinds: Mapping[str, LayerKind]
    inputs: dict | None
    missing: list[str]
    ties: list[list[str]]
    base_class: str


def _load_models(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    sources: list[int] | None = None,
    head: dict | None = None,
    keep_base: bool = True,
) -> _Loaded:
    """The merged model as stored, the base as stored (its parameters and layer kinds) and the unmerged PeftModel
    in the merged model's dtype. ``sources``: the base layer each layer of a deeper stack copies
    (layer_replication); the base's parameters and kinds are then named as that stack names them. ``head``: how
    the adapter's task loads the base (compat.heads.load_kwargs). ``keep_base`` False (the output check alone):
    the base's parameters are not kept beside the PeftModel built on them, so two models are held, not three."""
    head = head or {}
    merged_config = loading.read_model_config(merged_dir)
    merged_dtype = loading.stored_dtype(merged_dir, merged_config)
    missing: list[str] = []
    try:
        merged = loading.load_model(merged_dir, merged_dtype)
    except loading.MissingWeights as exc:
        missing = exc.keys
        merged = loading.load_model(merged_dir, merged_dtype, strict=False)
    base_native = loading.load_model(base_dir, loading.stored_dtype(base_dir), **head)
    kinds = layer_kinds(base_native)
    ties = shared_groups(base_native)
    if next(base_native.parameters()).dtype == merged_dtype:
        # Reuse the loaded base as the reference; clone first, since some inits rewrite base weights at load.
        base_params = {k: v.clone() for k, v in base_native.state_dict().items()} if keep_base else {}
        reference_base = base_native
    else:
        base_params = base_native.state_dict() if keep_base else {}
        reference_base = loading.load_model(base_dir, merged_dtype, **head)
    if sources is not None:
        prefix = layer_prefix(base_params)
        if prefix is not None:
            base_params, kinds = expand(base_params, sources, prefix), expand(kinds, sources, prefix)
    # the base's config sets the probe's length: a merged config cannot shorten what it is checked on
    inputs, base_class = probe_inputs(base_native.config, type(base_native)), type(base_native).__name__
    del base_native  # the reference's base, or (another dtype) released once its parameters are not kept
    reference = loading.load_peft(reference_base, adapter_dir)
    return _Loaded(merged, reference, base_params, kinds, inputs, missing, ties, base_class)


def adapter_precision(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the installed PEFT holds LoRA factors in within a model of ``model_dtype``."""
    if History.load().boundary("adapter_float32_in_half_models") <= Version(loading.installed_peft()):
        return torch.float32
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.float32


SUPPORTED_PEFT_TYPES = ("LORA",)


def require_lora(adapter: AdapterFiles) -> None:
    if adapter.peft_type.upper() not in SUPPORTED_PEFT_TYPES:
        raise BadInput(
            f"peft_type is {adapter.peft_type!r}; safe-merge merges {', '.join(SUPPORTED_PEFT_TYPES)} adapters",
            path=adapter.path / "adapter_config.json",
            key="peft_type",
            hint="use PEFT's own tools for other adapter types",
        )


def require_unchanged_base(adapter: AdapterFiles) -> None:
    """Refuse an adapter that PEFT applies to a base it rewrites at load: its merge into the base as stored is
    another model, and the exact merge this verifier computes would be the wrong reference."""
    found = base_rewrites(adapter.config)
    if found:
        first = found[0]
        raise BadInput(
            f"{first.value!r}: {first.why} while PEFT loads the adapter, so A and B fit only that rewritten "
            "base; merged into the base as stored they make another model",
            path=adapter.path / "adapter_config.json",
            key=first.key,
            hint=first.hint(),
        )
