"""The stream backend's verification, one tensor at a time: the ledger; every merged or replaced tensor read back
from its shard as soon as it is written and compared with the exact merge of the value it started from; then the
written checkpoint as a whole (its tensor names, dtypes and shapes against the base's, untouched tensors bit for
bit); the output-space check when the models fit in free memory (measured) or when asked.

The weight reference is the verifier's own (replay.py and delta.py), not the stream backend's arithmetic. A
tensor whose bits a known correct arithmetic writes is exact and costs one replay; the others are compared with
the float64 merge within the tolerance. Plain Linear weights, most of any model, are compared a block of rows at a
time by the same rule; for half-precision outputs that block reference is computed in float32, whose own rounding
(bounded and added to the tolerance) is 2^16 times finer than the stored dtype's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from safe_merge.io.buffers import Buffers
from safe_merge.io.checkpoint import Checkpoint
from safe_merge.merger.backends.stream import requantize
from safe_merge.merger.backends.stream.layout import BaseView, vocab_rows
from safe_merge.merger.backends.stream.write import StreamMerge
from safe_merge.verifier.accounting import accounting_problems, factor_paths, ties_problems
from safe_merge.verifier.checkpoint_files import carried_changes, file_problems, index_problems
from safe_merge.verifier.delta import LayerKind, ModuleLora, merged_weight
from safe_merge.verifier.diagnosis import diagnose
from safe_merge.verifier.outputs import OutputCheck, available_memory, float64_copy_fits
from safe_merge.verifier.replay import exact_match
from safe_merge.verifier.systematic import drift
from safe_merge.verifier.ties import tied_by_config
from safe_merge.verifier.tolerance import DORA_WEIGHT_ULPS, WEIGHT_ULPS, eps, smallest_step
from safe_merge.verifier.verdict import Verification, check_outputs_dirs
from safe_merge.verifier.weights import (
    Stats,
    WeightCheck,
    add_result,
    compare,
    compare_blocks,
    exact_result,
    expected_param,
    mismatched,
    untouched_failure,
)

OUTPUT_CHECKS = ("auto", "always", "never")
BLOCK_ELEMENTS = 2**18  # about 1 MiB per float32 temporary
MODELS_IN_MEMORY = 2  # the output check holds the merged model and the unmerged PeftModel (on the base) at once
# transformers and PEFT imported with a model class: 171 MiB measured (transformers 5.23, PEFT 0.21, torch 2.13 on
# CPU), with room for the probes' activations
LIBRARIES_FOR_MODELS = 256 * 2**20


@dataclass(frozen=True)
class OutputsPlan:
    """Whether the output check runs, decided once, before anything is written: `merge --plan` states the same
    rule and figure, the pipeline has transformers read the config only when it runs, and the memory it may hold
    is the one said (never re-measured later, when the page cache has grown)."""

    mode: str  # --check-outputs: auto, always or never
    need: int  # bytes the check adds to the process: models, adapter copies, the libraries that build them
    free: int  # bytes free when it was decided
    twin: int = 0  # and the float64 copy of one model that measures its rounding (outputs.rounding_noise), if it fits

    @property
    def runs(self) -> bool:
        return self.mode == "always" or (self.mode == "auto" and self.need <= self.free // 2)

    def why_not(self) -> str:
        if self.mode == "never":
            return "not asked for (--check-outputs never)"
        return (
            f"it would hold about {self.need / 2**30:.1f} GiB of models and {self.free / 2**30:.1f} GiB is free "
            "(--check-outputs always runs it anyway)"
        )


def plan_outputs(prep: StreamMerge, mode: str, free: int | None = None) -> OutputsPlan:
    """The output check for ``mode``, given ``free`` bytes (measured now when not given). It holds the merged
    model and the unmerged one (float twins for a stored base); a requantized output's sensitivity pass then holds
    one model and the float64 merge of every requantized weight. The adapter is held twice (as read, and in the
    PeftModel), and the libraries that build models are imported."""
    item = torch.tensor([], dtype=prep.dtype).element_size()
    size = sum(math.prod(i.shape) * item for i in prep.checkpoint.tensors.values())
    held = MODELS_IN_MEMORY * size
    if prep.requantize:
        touched = sum(math.prod(prep.checkpoint.tensors[n].shape) for n in prep.touched & set(prep.stored.groups))
        held = max(held, size + 8 * touched)
    adapter = sum(t.numel() * t.element_size() for t in prep.adapter_tensors.values())
    need = held + 2 * adapter + LIBRARIES_FOR_MODELS
    free = available_memory() if free is None else free
    numel = sum(math.prod(i.shape) for i in prep.checkpoint.tensors.values())
    largest = max((math.prod(i.shape) for i in prep.checkpoint.tensors.values()), default=0)
    twin = numel * 8 + largest * item if float64_copy_fits(numel, free) else 0
    return OutputsPlan(mode, need, free, twin)


class TensorChecks:
    """Checks each merged or replaced tensor as soon as it is written (read back from its shard), against the
    exact merge of the value it started from: the base is not read a second time."""

    def __init__(self, prep: StreamMerge):
        self.prep = prep
        self.base = BaseView(prep.checkpoint, prep.layout)
        self.results = WeightCheck()
        self.seen: set[str] = set()
        self.buffers = Buffers()  # the verifier's own: it shares no memory with the merge it checks

    def merge(self, results: list, seen: set[str]) -> None:
        """Results a worker process checked as it wrote its shards (stream/parallel.py)."""
        for result in results:
            add_result(self.results, result)
        self.seen |= seen

    def __call__(self, name: str, start: torch.Tensor, got: torch.Tensor) -> None:
        self.seen.add(name)
        if self.prep.requantize and name in self.prep.stored.groups:
            add_result(self.results, requantize.requantized_result(self.prep, name, start, got))
            return
        add_result(self.results, check_tensor(self.prep, self.base, name, start, got, self.buffers))


def check_tensor(
    prep: StreamMerge,
    base: BaseView,
    name: str,
    start: torch.Tensor | None,
    got: torch.Tensor,
    buffers: Buffers | None = None,
):
    """One touched tensor against its exact value after the merge; ``start`` is the base's value in the merged
    dtype when the caller has it (a plain Linear weight is then compared a block of rows at a time); ``buffers``
    keep the replay's large temporaries from one tensor to the next."""
    lora = prep.ledger.modules.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
    plain = lora is not None and _plain_linear(lora) and name not in prep.ledger.replacements
    if plain and start is not None:
        if tuple(got.shape) != tuple(start.shape):
            return mismatched(name, tuple(got.shape), tuple(start.shape))
        stored_dtype = prep.checkpoint.tensors[base.source(name)].dtype
        stored = (lambda: base[name]) if stored_dtype != got.dtype else None
        label = exact_match(got, start, lora, stored=stored, buffers=buffers)
        if label:
            return exact_result(name, label, got, start, lambda: _exact_change(lora, start))
        checked = compare_blocks(name, _linear_blocks(lora, start, got))
        if not checked.passed and not checked.problem:
            exact = _exact_change(lora, start)
            origin = start.to(torch.float64)
            checked.cause = diagnose(got, origin, lora, origin + exact)
        return checked
    return compare(name, expected_param(name, prep.ledger, base), got)


def _exact_change(lora: ModuleLora, start: torch.Tensor) -> torch.Tensor:
    origin = start.to(torch.float64)
    return merged_weight(origin, lora.widened()) - origin


def verify(
    prep: StreamMerge,
    stage: Path,
    base_dir: Path,
    adapter_dir: Path,
    outputs: OutputsPlan,
    checks: TensorChecks | None = None,
    tokenizer_from: Path | None = None,
) -> Verification:
    """The written checkpoint against the base and the adapter; ``checks`` holds the tensors already checked while
    they were written. A directory without config.json (bare safetensors) gets the weight checks only."""
    written = Checkpoint(stage)
    base = BaseView(prep.checkpoint, prep.layout)
    weights = check_weights(prep, base, written, checks)
    compared = {t.name for t in weights.tensors}
    weights.failures += accounting_problems(prep.adapter_tensors, prep.ledger, prep.checkpoint.tensors, compared)
    if not (stage / "config.json").is_file():
        reason = "the merged directory has no config.json (bare safetensors): its weights were checked, not its outputs"
        outputs = OutputCheck(False, reason=reason, optional=True)
        files = carried_changes(base_dir, tokenizer_from or adapter_dir, stage) + index_problems(stage)
        return Verification(prep.ledger, weights, outputs, config=files)
    paths = factor_paths(prep.adapter_tensors)
    tieable = set(vocab_rows(prep.checkpoint, prep.config))
    if any(p in tieable or p not in prep.checkpoint.tensors for p in paths.values()):  # only embeddings tie
        weights.failures += ties_problems(tied_by_config(stage) or [], paths)
    checked = _outputs(prep, stage, base_dir, adapter_dir, outputs)
    files = file_problems(base_dir, tokenizer_from or adapter_dir, stage)
    return Verification(prep.ledger, weights, checked, config=files)


def verify_checkpoint(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, tokenizer_from: Path, output_check: str = "auto"
) -> Verification | list[str]:
    """`safe-merge verify` one tensor at a time, as the stream backend checks what it writes: the base and the
    merged checkpoint are read tensor by tensor, never loaded as models (the output check loads them when it
    runs). Returns why not instead where the stream backend could not have read this base and adapter, or the
    merged checkpoint does not hold the tensors the base does (the caller then loads the models)."""
    from safe_merge.compat.adapter_files import load_adapter
    from safe_merge.io import loading
    from safe_merge.merger.backends.stream.backend import StreamBackend
    from safe_merge.merger.job import Job
    from safe_merge.merger.request import MergeRequest
    from safe_merge.quant import formats

    merged_config = loading.read_config_json(merged_dir) if (merged_dir / "config.json").is_file() else None
    quant = formats.from_config(merged_config) if merged_config is not None else None
    policy = "dequantize"
    if quant is not None and quant.stored is not None:
        # the base's format written back (--quantized requantize): the config names the dtype it loads in
        policy, dtype = "requantize", str(loading.config_dtype(merged_config)).removeprefix("torch.")
    else:
        dtype = str(loading.stored_dtype(merged_dir)).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        return [f"the merged checkpoint is stored in {dtype}"]
    request = MergeRequest(str(base_dir), (str(adapter_dir),), merged_dir / "unused", dtype=dtype, quantized=policy)
    offered = StreamBackend.offer(Job(request), load_adapter(adapter_dir, mapped=True))
    if isinstance(offered, list):
        return offered
    prep = offered.view
    if set(Checkpoint(merged_dir).tensors) != prep.written_names():
        return ["the merged checkpoint does not hold the tensors the base does (the model-loading check names them)"]
    outputs = plan_outputs(prep, output_check)
    return verify(prep, merged_dir, base_dir, adapter_dir, outputs, tokenizer_from=tokenizer_from)


def check_weights(prep: StreamMerge, base: BaseView, written: Checkpoint, checks: TensorChecks | None = None):
    """Every tensor of the written checkpoint: the set of names against the base's, untouched ones bit for bit,
    touched ones against their exact merge (unless ``checks`` already saw them written)."""
    check = checks.results if checks is not None else WeightCheck()
    check.rule = (
        requantize.RULE
        if prep.requantize
        else (
            f"{WEIGHT_ULPS:g} ulps ({DORA_WEIGHT_ULPS:g} for DoRA) of the stored dtype on the magnitudes rounded per "
            "element, plus r*eps*|s|*sum_k|B_ik|*max|A| per row for plain Linear weights (r*eps32*|s||B||A| elsewhere)"
        )
    )
    seen = checks.seen if checks is not None else set()
    expected = prep.written_names()
    missing = sorted(expected - set(written.tensors))
    if missing:
        check.failures.insert(0, f"missing from the merged checkpoint: {', '.join(missing[:5])}")
    extra = sorted(set(written.tensors) - expected)
    if extra:
        check.failures.insert(0, f"not in the base model: {', '.join(extra[:5])}")
    groups: set[str] = set()  # requantized weights not checked as they were written
    for name in sorted(expected & set(written.tensors)):
        info = written.tensors[name]
        group = prep.part(name)
        if group is not None:
            _check_part(prep, written, name, group, seen, groups, check)
            continue
        if name in seen:
            declared = (info.dtype, info.shape)
            if declared != (prep.out_dtype(name), prep.shape(name)):
                check.failures.append(f"{name}: the shard's header says {declared}, which is not what was checked")
            continue
        source = prep.checkpoint.tensors[base.source(name)]
        if name not in prep.touched and (source.dtype, source.shape) == (info.dtype, info.shape) and source.offset >= 0:
            if not written.same_bytes(name, prep.checkpoint, source.name):  # copied: compared a chunk at a time
                check.failures.append(untouched_failure(name, base[name], written.read(name)) or f"{name}: differs")
            continue
        got = written.read(name)
        if name in prep.touched:
            start = base[name].to(got.dtype) if name not in prep.ledger.replacements else None
            add_result(check, check_tensor(prep, base, name, start, got))
            continue
        failure = untouched_failure(name, base[name], got)
        if failure:
            check.failures.append(failure)
    for name in sorted(groups):
        got = prep.stored.codec.dequantize(
            prep.stored.groups[name], requantize.stored_parts(prep, name, written), prep.dtype
        )
        start = requantize.start_value(prep, base, name)
        add_result(check, requantize.requantized_result(prep, name, start, got))
    check.finish()
    return check


def _check_part(prep: StreamMerge, written: Checkpoint, name: str, group, seen: set[str], groups: set[str], check):
    """A stored part of a quantized weight in a requantized output: a weight the adapter leaves alone is the
    base's byte for byte; the parts of one it changes are checked together, as the weight they make."""
    info, source = written.tensors[name], prep.source_info(name)
    if (info.dtype, tuple(info.shape)) != (source.dtype, tuple(source.shape)):
        check.failures.append(
            f"{name}: stored as {info.dtype} {tuple(info.shape)}, the base's format has "
            f"{source.dtype} {tuple(source.shape)}"
        )
    elif group.name in prep.touched:
        if group.name not in seen:
            groups.add(group.name)
    elif not written.same_bytes(name, prep.stored.stored, name):
        failure = untouched_failure(name, prep.stored.stored.read(name), written.read(name))
        check.failures.append(failure or f"{name}: differs from the base's bytes")


def _plain_linear(lora: ModuleLora) -> bool:
    return lora.kind is LayerKind.LINEAR and lora.magnitude is None


def _linear_blocks(lora: ModuleLora, start: torch.Tensor, got: torch.Tensor) -> Iterator[Stats]:
    """The weight check of weights.py for W + s·B·A, a block of output rows at a time, in as few passes as the
    rule allows: float64 for float32 weights, float32 for half-precision ones. The product's rounding is bounded
    per row, r·ε·|s|·Σ_k|B_ik|·max|A| (at least r·ε·|s|·Σ_k|B_ik||A_kj| for every element), in the precision the
    merging PEFT multiplied in plus this reference's own."""
    precision = torch.float64 if got.dtype in (torch.float32, torch.float64) else torch.float32
    a, b = lora.a.to(precision), lora.b.to(precision)
    unit = (lora.rank + 2) * (eps(lora.compute_dtype) + eps(precision))
    row_bound = b.abs().sum(dim=1, keepdim=True).mul_(abs(lora.scale) * float(a.abs().max()) * unit)
    ulps, floor = WEIGHT_ULPS * eps(got.dtype), WEIGHT_ULPS * smallest_step(got.dtype)
    rows = max(1, BLOCK_ELEMENTS // max(1, start.shape[1]))
    worst_so_far, resolvable = -1.0, False
    for i in range(0, start.shape[0], rows):
        j = min(i + rows, start.shape[0])
        w = start[i:j].to(precision)
        value = torch.addmm(w, b[i:j], a, alpha=lora.scale)
        change = torch.sub(value, w)
        leaning = drift(got[i:j], start[i:j], change)
        moved = change.abs_()
        residual = got[i:j].to(precision).sub_(value).abs_()
        tol = w.abs_().add_(value.abs()).add_(moved).mul_(ulps).add_(row_bound[i:j] + floor)  # merge_magnitudes
        max_abs = float(residual.max())
        ratio = residual.div_(tol)
        worst = float(ratio.max())  # NaN when the merged block holds NaN: then it is the worst
        at = tol.new_tensor(0.0)
        if not worst <= worst_so_far:  # locating the element is slow: only where the worst so far moves
            worst_so_far = worst
            at = tol.flatten()[int(torch.argmax(ratio))]
        resolvable = resolvable or bool((moved > tol).any())  # a tensor is resolvable once any element is
        delta = float(moved.max())
        yield Stats(
            max_abs=max_abs,
            ratio=worst,
            tol=float(at),
            delta=delta,
            size=float(value.abs_().max()) if delta == 0 else 0.0,  # only read where nothing moved
            resolvable=resolvable,
            finite=math.isfinite(max_abs),
            drift=leaning,
        )


def _outputs(prep: StreamMerge, stage: Path, base_dir: Path, adapter_dir: Path, plan: OutputsPlan) -> OutputCheck:
    """Run the output check when asked, or (auto) when the models it loads fit in half the free memory."""
    if not plan.runs:
        return OutputCheck(False, reason=plan.why_not(), optional=True)
    if prep.stored is not None:
        from safe_merge.merger.backends.stream.dequantized import stored_outputs

        return stored_outputs(prep, stage, base_dir, adapter_dir, bool(plan.twin))
    return check_outputs_dirs(base_dir, adapter_dir, stage, bool(plan.twin))
