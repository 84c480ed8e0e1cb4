"""The merge command's work: read, merge, write to staging, verify what was written, publish, report."""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safe_merge.compat.adapter_files import load_adapter, nonfinite_tensors
from safe_merge.compat.plan import Plan, make_plan, write_state
from safe_merge.errors import BadInput
from safe_merge.merger import backend_peft, loading
from safe_merge.merger.staging import check_target, staged
from safe_merge.merger.verify import PASSED, require_lora, verify_dirs
from safe_merge.merger.write import DEFAULT_SHARD_SIZE, tokenizer_size, tokenizer_source, write_model


@dataclass
class MergeRequest:
    base: str
    adapters: list[str]
    out: Path
    dtype: str = "auto"
    backend: str = "auto"
    force: bool = False
    max_shard_size: str = DEFAULT_SHARD_SIZE
    plan: bool = False  # say what would happen; write nothing


@dataclass
class Prepared:
    """Everything checked and decided before any model is loaded."""

    out: Path
    base_dir: Path
    base_config: object
    dtype: torch.dtype
    source_dir: Path  # the user's adapter, never written to
    plan: Plan  # its migration to the installed PEFT
    started: float


def run_merge(req: MergeRequest) -> dict:
    """Merge, verify and publish; returns the report (its status says whether OUT was written)."""
    started = time.monotonic()
    if len(req.adapters) != 1:
        raise BadInput(
            f"{len(req.adapters)} adapters given; this release merges one adapter at a time",
            hint="merge a single ADAPTER",
        )
    if req.backend not in ("auto", "peft"):
        raise BadInput(f"backend {req.backend!r} is not available in this release", hint="use --backend peft")
    out = Path(req.out)
    check_target(out, req.force)
    base_dir = loading.resolve_dir(req.base, "base model")
    source_dir = loading.resolve_dir(req.adapters[0], "adapter")
    source = load_adapter(source_dir)
    require_lora(source)
    broken = nonfinite_tensors(source)
    if broken:
        raise BadInput(
            f"{len(broken)} adapter tensors hold NaN or Inf (first: {broken[0]})",
            path=source.weight_file,
            hint="the training run diverged or the file is corrupt; use an earlier checkpoint",
        )
    plan, state = make_plan(source, loading.installed_peft())
    if plan.refused:
        raise BadInput(plan.refusal_message(), hint="merge with a PEFT release that understands these keys")
    base_config = loading.read_model_config(base_dir)
    refuse_quantized(base_config, base_dir)
    refuse_tokenizer_mismatch(base_config, base_dir, source_dir)
    dtype = loading.stored_dtype(base_dir, base_config) if req.dtype == "auto" else loading.DTYPES[req.dtype]

    prep = Prepared(out, base_dir, base_config, dtype, source_dir, plan, started)
    if req.plan:
        return merge_plan(req, prep)
    with tempfile.TemporaryDirectory(
        prefix=".safe-merge-adapter-", dir=out.parent if out.parent.exists() else None
    ) as t:
        adapter_dir = source_dir
        if plan.steps:  # merge a migrated copy; the user's adapter is never touched
            adapter_dir = Path(t)
            write_state(state, source_dir, adapter_dir)
        return _merge_and_publish(req, prep, adapter_dir)


def _merge_and_publish(req: MergeRequest, prep: Prepared, adapter_dir: Path) -> dict:
    out, base_dir, base_config, dtype, plan = prep.out, prep.base_dir, prep.base_config, prep.dtype, prep.plan
    adapter = load_adapter(adapter_dir)
    progress = tqdm(total=3, desc="safe-merge", unit="stage", disable=None, leave=False)
    progress.set_postfix_str("merging")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        merged, notes = backend_peft.merge(base_dir, adapter, dtype)
    progress.update()
    caught = _unique(
        str(r.message).splitlines()[0][:300]
        for r in records
        if not issubclass(r.category, (DeprecationWarning, FutureWarning))  # library housekeeping, not about this merge
    )

    report = {
        "status": None,
        "versions": loading.versions(),
        "base": {"path": str(base_dir), "class": loading.model_class(base_config).__name__},
        "adapters": [
            {
                "path": str(prep.source_dir),
                "origin_peft": plan.origin,
                "peft_version": adapter.config.get("peft_version"),
                "migrations": plan.steps,
            }
        ],
        "backend": "peft",
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": None,
        "output": {"path": str(out), "files": []},
    }
    with staged(out, req.force) as stage:
        progress.set_postfix_str("writing")
        files = write_model(merged, stage, base_dir, adapter_dir, req.max_shard_size)
        del merged
        progress.update()
        progress.set_postfix_str("verifying")
        verification = verify_dirs(base_dir, adapter_dir, stage)
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
        report["warnings"] = notes + body["warnings"] + caught
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


def merge_plan(req: MergeRequest, prep: Prepared) -> dict:
    """What `merge` would do, read from headers and configs only: nothing is loaded or written."""
    from safe_merge.merger.outputs import available_memory
    from safe_merge.merger.probes import probe_inputs

    base_dir, base_config, dtype, plan = prep.base_dir, prep.base_config, prep.dtype, prep.plan
    numel = loading.floating_numel(base_dir)
    native = loading.stored_dtype(base_dir, base_config)

    def size(dtype_: torch.dtype) -> int | None:
        return numel * torch.tensor([], dtype=dtype_).element_size() if numel else None

    free = available_memory()
    twin = numel * 8 if numel and numel * 8 <= free // 2 else 0
    # verification holds the merged model, the base as stored and the reference in the merged dtype at once, plus
    # a float64 twin of the reference when it fits in half the free memory (the noise measurement)
    peak = size(dtype) * 2 + size(native) + twin if numel else None
    probes = probe_inputs(base_config)
    return {
        "status": "planned",
        "versions": loading.versions(),
        "base": {
            "path": str(base_dir),
            "class": loading.model_class(base_config).__name__,
            "stored_dtype": str(native).removeprefix("torch."),
            "parameters": numel,
        },
        "adapters": [{"path": str(prep.source_dir), "origin_peft": plan.origin, "migrations": plan.steps}],
        "backend": "peft",
        "backend_reason": "the PEFT backend is the one this release has",
        "dtype": str(dtype).removeprefix("torch."),
        "output": {
            "path": str(req.out),
            "estimated_bytes": size(dtype),
            "max_shard_size": req.max_shard_size,
            "written": False,
        },
        "peak_memory_estimate": {"bytes": peak, "free_now": free, "float64_noise_twin": bool(twin)},
        "checks": [
            "ledger of every adapter tensor",
            "weights: every parameter against the float64 merge",
            f"outputs against the unmerged PeftModel on {', '.join(probes) if probes else 'no probe: a gap'}",
        ],
        "seconds": round(time.monotonic() - prep.started, 3),
        "exit_code": 0,
    }


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


def refuse_quantized(config, base_dir: Path) -> None:
    """A quantized base cannot be merged into exactly, and this release cannot yet measure the error: refuse."""
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = (
            quant.get("quant_method", "unknown") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        )
        raise BadInput(
            f"the base is quantized ({method}); this release does not merge into quantized bases",
            path=base_dir / "config.json",
            key="quantization_config",
            hint="merge into the unquantized base model, then quantize the merged model",
        )


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
