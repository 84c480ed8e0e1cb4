"""The merge command's work: read, merge, write to staging, verify what was written, publish, report."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safe_merge.compat.adapter_files import AdapterFiles, load_adapter, nonfinite_tensors
from safe_merge.compat.migrations.base import State
from safe_merge.compat.plan import Plan, make_plan, write_state
from safe_merge.errors import BadInput, SafeMergeError
from safe_merge.io import loading
from safe_merge.io.model_dir import (
    DEFAULT_SHARD_SIZE,
    TOKENIZER_FILES,
    tokenizer_size,
    tokenizer_source,
    write_model,
)
from safe_merge.io.staging import check_target, staged
from safe_merge.merger.backends import choice as backend_choice
from safe_merge.merger.backends import peft as backend_peft
from safe_merge.merger.backends import quantized as quantized_merge
from safe_merge.merger.backends.stream import verify as stream_verify
from safe_merge.merger.backends.stream import write as stream_backend
from safe_merge.merger.rules.combinable import (
    Combination,
    parse_combination,
    refuse_changed_copies,
    refuse_uncombinable,
)
from safe_merge.merger.rules.known_bugs import refuse_combination_bugs, refuse_known_bugs
from safe_merge.quant import formats as quantized
from safe_merge.quant.formats import Quantization
from safe_merge.verifier.combined_adapter import CombinationCheck, check_combination
from safe_merge.verifier.layer_kinds import layer_kinds
from safe_merge.verifier.verdict import PASSED, adapter_precision, require_lora, verify_dirs


@dataclass
class MergeRequest:
    base: str
    adapters: list[str]
    out: Path
    dtype: str = "auto"
    backend: str = "auto"
    force: bool = False
    max_shard_size: str | None = None  # None: the stream backend mirrors the base's shards, PEFT uses 5GB
    plan: bool = False  # say what would happen; write nothing
    combination: Combination | None = None  # how to join several adapters (or weight one)
    quantized: str = "dequantize"  # a quantized base: dequantize | requantize | refuse (see merger/quantized.py)
    check_outputs: str = "auto"  # stream backend: auto (when the models fit in free memory) | always | never


@dataclass
class Source:
    """One adapter as the user gave it (never written to), and its migration to the installed PEFT."""

    path: Path
    files: AdapterFiles
    plan: Plan
    state: State

    def release(self) -> None:
        """Drop the tensors (config, plan and paths stay for the report)."""
        self.files.tensors = {}
        self.state.tensors = {}

    def report(self, weight: float | None = None) -> dict:
        out = {
            "path": str(self.path),
            "origin_peft": self.plan.origin,
            "peft_version": self.files.config.get("peft_version"),
            "migrations": self.plan.steps,
        }
        if weight is not None:
            out["weight"] = weight
        return out


@dataclass
class Prepared:
    """Everything checked and decided before any model is loaded."""

    out: Path
    base_dir: Path
    base_config: object
    dtype: torch.dtype
    sources: list[Source]
    combination: Combination | None
    started: float
    quant: Quantization | None = None
    policy: str = "dequantize"


def run_merge(req: MergeRequest) -> dict:
    """Merge, verify and publish; returns the report (its status says whether OUT was written)."""
    started = time.monotonic()
    combination = req.combination
    if combination is None and len(req.adapters) > 1:
        combination = parse_combination("cat", None, len(req.adapters))
    if req.backend not in backend_choice.BACKENDS:
        raise BadInput(f"--backend {req.backend!r} is not one of {', '.join(backend_choice.BACKENDS)}")
    if req.check_outputs not in stream_verify.OUTPUT_CHECKS:
        raise BadInput(f"--check-outputs {req.check_outputs!r} is not one of {', '.join(stream_verify.OUTPUT_CHECKS)}")
    out = Path(req.out)
    check_target(out, req.force)
    base_dir = loading.resolve_dir(req.base, "base model")
    release = loading.installed_peft()
    sources = [read_source(loading.resolve_dir(a, "adapter"), release) for a in req.adapters]
    if combination is not None:
        refuse_uncombinable(combination, [s.files for s in sources], release, base_dir)
        refuse_combination_bugs(combination, [s.files for s in sources], release)
    base_config = loading.read_config_json(base_dir)
    quant = quantization(base_config, base_dir, req.quantized, combination)
    for source in sources:
        refuse_tokenizer_mismatch(base_config, base_dir, source.path)
    dtype = loading.stored_dtype(base_dir, base_config) if req.dtype == "auto" else loading.DTYPES[req.dtype]
    for source in sources:
        refuse_known_bugs(source.files, release, dtype, getattr(base_config, "model_type", None))

    prep = Prepared(out, base_dir, base_config, dtype, sources, combination, started, quant, req.quantized)
    if req.plan:
        return merge_plan(req, prep)
    with tempfile.TemporaryDirectory(
        prefix=".safe-merge-adapter-", dir=out.parent if out.parent.exists() else None
    ) as t:
        adapter_dirs = []
        for i, source in enumerate(sources):
            adapter_dir = source.path
            if source.plan.steps:  # merge a migrated copy; the user's adapter is never touched
                adapter_dir = Path(t) / f"migrated-{i}"
                adapter_dir.mkdir()
                write_state(source.state, source.path, adapter_dir)
            adapter_dirs.append(adapter_dir)
        if combination is None:
            for source in sources:  # from here the adapter is read from adapter_dirs: hold it once, not twice
                source.release()
            return _merge_and_publish(req, prep, adapter_dirs[0])
        combined_dir = Path(t) / "combined"
        notes, check = _combine(prep, adapter_dirs, combined_dir)
        return _merge_and_publish(req, prep, combined_dir, notes, check)


def read_source(path: Path, release: str, refusal: type[SafeMergeError] = BadInput) -> Source:
    """Read one adapter and plan its migration to ``release``; refuse what cannot be merged at all (a migration
    the release cannot take raises ``refusal``)."""
    files = load_adapter(path, mapped=True)
    require_lora(files)
    broken = nonfinite_tensors(files)
    if broken:
        raise BadInput(
            f"{len(broken)} adapter tensors hold NaN or Inf (first: {broken[0]})",
            path=files.weight_file,
            hint="the training run diverged or the file is corrupt; use an earlier checkpoint",
        )
    plan, state = make_plan(files, release)
    if plan.refused:
        raise refusal(plan.refusal_message(), hint="merge with a PEFT release that understands these keys")
    return Source(path, files, plan, state)


def _combine(prep: Prepared, adapter_dirs: list[Path], combined_dir: Path) -> tuple[list[str], CombinationCheck]:
    """Build the combined adapter (float32, whatever the output dtype) and check it against the sources."""
    combined_dir.mkdir()
    model = loading.load_model(prep.base_dir, torch.float32)
    kinds = layer_kinds(model)
    base_params = {name: p.detach() for name, p in model.state_dict().items()}
    refuse_changed_copies([s.files for s in prep.sources], base_params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        notes = backend_peft.combine(model, adapter_dirs, prep.combination, combined_dir)
    del model
    _carry_tokenizer([s.path for s in prep.sources], combined_dir)
    sources = [load_adapter(d) for d in adapter_dirs]
    combined = load_adapter(combined_dir)
    check = check_combination(sources, combined, prep.combination, base_params, kinds, loading.installed_peft())
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


def _merge_and_publish(
    req: MergeRequest,
    prep: Prepared,
    adapter_dir: Path,
    combine_notes: list[str] | None = None,
    combination_check: CombinationCheck | None = None,
) -> dict:
    out, base_dir, dtype = prep.out, prep.base_dir, prep.dtype
    adapter = load_adapter(adapter_dir, mapped=req.backend != "peft" and prep.combination is None)
    backend, reason, streamed = _choose_backend(req, prep, adapter)
    progress = tqdm(total=3, desc="safe-merge", unit="stage", disable=None, leave=False)
    report = {
        "status": None,
        "versions": loading.versions(),
        "base": {"path": str(base_dir), "class": loading.class_name(prep.base_config)},
        "adapters": _adapters_report(prep, combination_check),
        "backend": backend,
        "backend_reason": reason,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": None if prep.quant is None else {**prep.quant.report(), "policy": prep.policy},
        "output": {"path": str(out), "files": []},
    }
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        merged, notes = None, []
        if streamed is None:
            progress.set_postfix_str("merging")
            if prep.quant is None:
                merged, notes = backend_peft.merge(base_dir, adapter, dtype)
            else:
                merged, notes = quantized_merge.merge(base_dir, adapter, prep.policy, dtype)
        progress.update()
    caught = _unique(
        str(r.message).splitlines()[0][:300]
        for r in records
        if not issubclass(r.category, (DeprecationWarning, FutureWarning))  # library housekeeping, not about this merge
    )
    with staged(out, req.force) as stage:
        progress.set_postfix_str("writing")
        if streamed is None:
            files = write_model(merged, stage, base_dir, adapter_dir, req.max_shard_size or DEFAULT_SHARD_SIZE)
            del merged
        else:
            checks = stream_verify.TensorChecks(streamed)
            written = stream_backend.write(streamed, stage, base_dir, adapter_dir, req.max_shard_size, checks)
            files, notes = written.files, written.notes
            report["stream"] = {"tensors": written.counts, "seconds": written.seconds}
        progress.update()
        progress.set_postfix_str("verifying")
        if streamed is not None:
            with written.timing("verify"):
                verification = stream_verify.verify(streamed, stage, base_dir, adapter_dir, req.check_outputs, checks)
        elif prep.quant is None:
            verification = verify_dirs(base_dir, adapter_dir, stage)
        else:
            verification = quantized_merge.verify(base_dir, adapter_dir, stage, prep.quant, prep.policy, dtype)
            report["quantization"] = verification.quantized.report()
        verification.combination = combination_check
        progress.update()
        progress.close()
        body = verification.report()
        report.update(
            status=body["status"],
            ledger=body["ledger"],
            verification=body["verification"],
            problems=body["problems"],
            gaps=body["gaps"],
        )
        if prep.combination is not None:
            report["combination"] = {**prep.combination.report(), "combined_rank": _rank(adapter)}
        report["warnings"] = (combine_notes or []) + notes + body["warnings"] + caught
        report["output"]["files"] = files
        if verification.status != PASSED:
            report["output"] = {
                "path": None,
                "files": [],
                "not_written": f"verification {verification.status}",
            }
            raise _Abandon(report, verification.exit_code)
    report["seconds"] = round(time.monotonic() - prep.started, 3)
    report["exit_code"] = 0
    return report


def _choose_backend(
    req: MergeRequest, prep: Prepared, adapter: AdapterFiles
) -> tuple[str, str, stream_backend.Prepared | None]:
    """(backend, reason, the stream backend's view of the merge when it is the one)."""
    early = backend_choice.stream_blockers(
        None, prep.base_config, combining=prep.combination is not None, quantized=prep.quant is not None
    )
    streamed = None
    if not early and req.backend != "peft":
        streamed = stream_backend.prepare(prep.base_dir, adapter, prep.dtype, adapter_precision(prep.dtype))
        early = backend_choice.stream_blockers(streamed, prep.base_config, combining=False, quantized=False)
    backend, reason = backend_choice.choose(req.backend, early)
    return backend, reason, streamed if backend == "stream" else None


def merge_plan(req: MergeRequest, prep: Prepared) -> dict:
    """What `merge` would do, read from headers and configs only: nothing is loaded or written."""
    from safe_merge.verifier.outputs import available_memory
    from safe_merge.verifier.probes import probe_inputs

    base_dir, base_config, dtype = prep.base_dir, prep.base_config, prep.dtype
    backend, reason, streamed = _choose_backend(req, prep, prep.sources[0].files)
    numel = loading.floating_numel(base_dir)
    native = loading.stored_dtype(base_dir, base_config)

    def size(dtype_: torch.dtype) -> int | None:
        return numel * torch.tensor([], dtype=dtype_).element_size() if numel else None

    free = available_memory()
    twin = numel * 8 if numel and numel * 8 <= free // 2 else 0
    # verification holds the merged model, the base as stored and the reference in the merged dtype at once, plus
    # a float64 twin of the reference when it fits in half the free memory (the noise measurement)
    peak = size(dtype) * 2 + size(native) + twin if numel else None
    if peak and prep.combination is not None:  # combining holds the base in float32 with every adapter loaded
        peak = max(peak, size(torch.float32) + sum(s.files.weight_file.stat().st_size for s in prep.sources) * 2)
    outputs_check = None
    if streamed is not None:
        peak, outputs_check = _stream_peak(req, streamed, prep.sources[0].files, free)
    probes = probe_inputs(base_config)
    return {
        "status": "planned",
        "versions": loading.versions(),
        "base": {
            "path": str(base_dir),
            "class": loading.class_name(base_config),
            "stored_dtype": str(native).removeprefix("torch."),
            "parameters": numel,
        },
        "adapters": _adapters_report(prep, None),
        **({"combination": prep.combination.report()} if prep.combination else {}),
        "backend": backend,
        "backend_reason": reason,
        "dtype": str(dtype).removeprefix("torch."),
        "output": {
            "path": str(req.out),
            "estimated_bytes": size(dtype),
            "max_shard_size": req.max_shard_size,
            "written": False,
        },
        "peak_memory_estimate": {
            "bytes": peak,
            "free_now": free,
            "float64_noise_twin": bool(twin) and streamed is None,
            **({"output_check": outputs_check} if outputs_check else {}),
        },
        "checks": [
            *(
                [f"the combined adapter against what {prep.combination.type} of the adapters means"]
                if prep.combination
                else []
            ),
            "ledger of every adapter tensor",
            *(
                [
                    f"quantized base ({prep.quant.describe()}), merged by {prep.policy}: weights against "
                    "dequant(W)+ΔW, outputs against the unmerged model on the quantized base, within the method's "
                    "budget"
                ]
                if prep.quant
                else ["weights: every parameter against the float64 merge"]
            ),
            f"outputs against the unmerged PeftModel on {', '.join(probes) if probes else 'no probe: a gap'}",
        ],
        "quantization": None if prep.quant is None else {**prep.quant.report(), "policy": prep.policy},
        "seconds": round(time.monotonic() - prep.started, 3),
        "exit_code": 0,
    }


def _stream_peak(req: MergeRequest, streamed: stream_backend.Prepared, adapter: AdapterFiles, free: int):
    """The stream backend holds the adapter, and per tensor the base tensor, its merge and (verifying a tensor
    that is not a plain Linear) its float64 reference with its tolerance terms; the output check, when it runs,
    holds the models."""
    largest = max((i.shape for i in streamed.checkpoint.tensors.values()), key=math.prod, default=())
    item = torch.tensor([], dtype=streamed.dtype).element_size()
    peak = adapter.weight_file.stat().st_size + math.prod(largest) * (3 * item + 5 * 8)
    size = sum(math.prod(i.shape) * item for i in streamed.checkpoint.tensors.values())
    need = stream_verify.MODELS_IN_MEMORY * size
    runs = req.check_outputs == "always" or (req.check_outputs == "auto" and need <= free // 2)
    return (max(peak, need) if runs else peak), f"{'runs' if runs else 'skipped'} ({req.check_outputs})"


def _adapters_report(prep: Prepared, check: CombinationCheck | None) -> list[dict]:
    weights = prep.combination.weights if prep.combination else [None] * len(prep.sources)
    rows = [s.report(w) for s, w in zip(prep.sources, weights, strict=True)]
    if check is not None:
        for row, ledger in zip(rows, check.sources, strict=True):
            row["ledger"] = ledger.summary()
    return rows


def _rank(adapter: AdapterFiles) -> int | None:
    ranks = [int(t.shape[0]) for k, t in adapter.tensors.items() if k.endswith(("lora_A.weight", "lora_embedding_A"))]
    return max(ranks, default=None)


def refuse_tokenizer_mismatch(config, base_dir: Path, adapter_dir: Path) -> None:
    """The tokenizer that goes into OUT must not produce ids the model has no embedding row for."""
    source = tokenizer_source(adapter_dir, base_dir)
    size = tokenizer_size(source) if source else None
    rows = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
    if size and rows and size > rows:
        raise BadInput(
            f"the tokenizer has {size} token ids but the model's embedding has {rows} rows",
            path=source / "tokenizer.json",
            hint="resize the base's embeddings to the tokenizer (and train them) before merging, "
            "or merge with the tokenizer the adapter was trained with",
        )


def quantization(config, base_dir: Path, policy: str, combination: Combination | None) -> Quantization | None:
    """The base's quantization, when its config declares one; refused when the policy says so, or when several
    adapters would have to be combined on it."""
    quant = quantized.from_config(config)
    if quant is None:
        return None
    if policy not in quantized.POLICIES:
        raise BadInput(f"--quantized {policy!r} is not one of {', '.join(quantized.POLICIES)}")
    if policy == "refuse":
        quantized.refuse(quant, base_dir / "config.json")
    quantized.require_library(quant, base_dir / "config.json")
    if combination is not None:
        raise BadInput(
            f"the base is quantized ({quant.describe()}); combining adapters on it is not supported",
            path=base_dir / "config.json",
            key="quantization_config",
            hint="merge one adapter at a time, or into the unquantized base",
        )
    return quant


class _Abandon(Exception):
    """Leaves the staging block without publishing; carries the report out."""

    def __init__(self, report: dict, exit_code: int):
        super().__init__(report["status"])
        self.report = report
        self.exit_code = exit_code


def merge_command(req: MergeRequest) -> dict:
    """run_merge, with an unverified result turned into a report with its exit code instead of an exception."""
    started = time.monotonic()
    try:
        return run_merge(req)
    except _Abandon as stop:
        stop.report["seconds"] = round(time.monotonic() - started, 3)
        stop.report["exit_code"] = stop.exit_code
        return stop.report


def _unique(lines) -> list[str]:
    seen: dict[str, None] = {}
    for line in lines:
        seen.setdefault(line, None)
    return list(seen)
