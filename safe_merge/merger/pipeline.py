"""The merge command's work: preflight, migrate (and combine), merge, write to staging, verify what was written,
publish, report. The backend is whichever ``backends.choose`` returns; nothing here asks which one it is."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safe_merge.compat import pairs
from safe_merge.compat.adapter_files import AdapterFiles, load_adapter
from safe_merge.errors import EXIT_PUSH_FAILED, BadInput
from safe_merge.io import hub, loading, staging
from safe_merge.merger import backends
from safe_merge.merger.card import input_name, write_card
from safe_merge.merger.job import Job
from safe_merge.merger.preflight import preflight
from safe_merge.merger.request import MergeRequest
from safe_merge.merger.rules import base_config, rule
from safe_merge.merger.weighted_adapter import build_and_check
from safe_merge.quant.stored.view import open_checkpoint
from safe_merge.verifier.combined_adapter import CombinationCheck
from safe_merge.verifier.outputs import available_memory
from safe_merge.verifier.probes import probe_inputs
from safe_merge.verifier.verdict import PASSED


def merge_command(request: MergeRequest) -> dict:
    """Merge, verify and publish; the report, whose status and exit_code say whether OUT was written. Refusals
    before any work raise (a SafeMergeError with its exit code)."""
    started = time.monotonic()
    try:
        report = run_merge(request)
    except _Abandon as stop:
        stop.report["seconds"] = round(time.monotonic() - started, 3)
        stop.report["exit_code"] = stop.exit_code
        report = stop.report
    if request.report is not None and report["status"] != PASSED:  # a published merge wrote it with OUT
        staging.write_file(request.report, report_text(report), request.force)
    if request.push_to_hub is not None and report["status"] == PASSED:
        report["push"] = push_output(Path(report["output"]["path"]), request.push_to_hub, request.private, report)
        if report["push"]["status"] != "pushed":
            report["exit_code"] = EXIT_PUSH_FAILED
        if request.report is not None:  # the copy published with OUT, rewritten with the upload's outcome
            staging.write_file(request.report, report_text(report), force=True)
    return report


def push_output(out: Path, repo_id: str, private: bool, report: dict | None = None) -> dict:
    """Upload a published OUT; a failure leaves OUT as it is and says how to push it again."""
    message = "safe-merge: " + (
        f"{input_name(report['base'])} + {', '.join(input_name(a) for a in report['adapters'])}" if report else out.name
    )
    try:
        return hub.push(out, repo_id, private, message)
    except Exception as exc:
        return {
            "status": "failed",
            "repo_id": repo_id,
            "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}",
            "local": str(out),
            "retry": hub.retry_command(out, repo_id, private),
        }


def report_text(report: dict) -> str:
    """The report as --report and --json write it."""
    return json.dumps(report, indent=2, default=str) + "\n"


def run_merge(request: MergeRequest) -> dict:
    """As merge_command, with an unverified result raised as _Abandon."""
    job = preflight(request)
    if request.plan:
        return plan(job)
    out = Path(os.path.abspath(job.out))
    stale = staging.sweep_stale(out.parent, keep_for=out.name)
    with staging.temporary(out.parent, out.name, "adapter") as scratch:
        with _disk_full_says_how_much(job):  # the migrated copies are written beside OUT too
            adapter_dirs = [source.materialize(Path(scratch) / f"migrated-{i}") for i, source in enumerate(job.sources)]
        if job.combination is None:
            for source in job.sources:  # from here the adapter is read from adapter_dirs: hold it once, not twice
                source.drop_tensors()
            return _merge_and_publish(job, adapter_dirs[0], stale)
        combined_dir = Path(scratch) / "combined"
        notes, check = build_and_check(job, adapter_dirs, combined_dir)
        return _merge_and_publish(job, combined_dir, stale + notes, check)


def _merge_and_publish(job: Job, adapter_dir: Path, notes: list[str], check: CombinationCheck | None = None) -> dict:
    adapter = load_adapter(adapter_dir, mapped=job.request.backend != "peft" and job.combination is None)
    backend, reason = backends.choose(job, adapter)
    _models_readable(job, backend)
    progress = tqdm(total=3, desc="safe-merge", unit="stage", disable=None, leave=False)
    report = {
        "status": None,
        "versions": loading.versions(),
        "base": _base_report(job),
        "adapters": job.adapters_report([ledger.summary() for ledger in check.sources] if check else None),
        "backend": backend.name,
        "backend_reason": reason,
        "dtype": _dtype_name(job.dtype),
        "quantization": _quantization(job),
        "output": {"path": str(job.out), "files": []},
    }
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        progress.set_postfix_str("merging")
        backend.merge()
        progress.update()
    caught = _unique(
        str(r.message).splitlines()[0][:300]
        for r in records
        if not issubclass(r.category, (DeprecationWarning, FutureWarning))  # library housekeeping, not about this merge
    )
    side_files: dict[Path, str] = {}
    resumed: list[str] = []
    resume_key = backend.resume_key() if hasattr(backend, "resume_key") else None
    with (
        _disk_full_says_how_much(job),
        staging.staged(job.out, job.request.force, side_files, resume_key, resumed) as stage,
    ):
        progress.set_postfix_str("writing")
        files = backend.write(stage)
        progress.update()
        progress.set_postfix_str("verifying")
        verification = backend.verify(stage)
        verification.combination = check
        progress.update()
        progress.close()
        report.update(backend.report())
        body = verification.report()
        for key in ("status", "ledger", "verification", "problems", "gaps"):
            report[key] = body[key]
        if job.combination is not None:
            report["combination"] = {**job.combination.report(), "combined_rank": _rank(adapter)}
        report["warnings"] = (
            pairs.declared_warnings()
            + job.revision_notes()
            + notes
            + resumed
            + backend.notes
            + body["warnings"]
            + caught
        )
        report["output"]["files"] = files
        if verification.status != PASSED:
            report["output"] = {"path": None, "files": [], "not_written": f"verification {verification.status}"}
            raise _Abandon(report, verification.exit_code)
        if job.request.card:
            files.append(write_card(stage, report, job.request, job.base_dir, job.adapter_dirs))
        report["seconds"] = round(time.monotonic() - job.started, 3)
        report["exit_code"] = 0
        if job.request.report is not None:  # written before the publish, moved into place with it
            side_files[job.request.report] = report_text(report)
    return report


@contextlib.contextmanager
def _disk_full_says_how_much(job: Job):
    """A full disk (or quota) while writing OUT: say how much room the merge needs there."""
    try:
        yield
    except Exception as exc:
        if not staging.no_space(exc):
            raise
        size, parent = _size(job), Path(os.path.abspath(job.out)).parent
        need = f"about {size / 1e9:.2f} GB" if size else "the size of the base in the output dtype"
        free = shutil.disk_usage(parent).free if parent.exists() else 0
        hint = "free space there, or choose an -o on a filesystem with room; nothing was written"
        kept = getattr(exc, "kept", None)
        if kept is not None:
            hint = (
                f"free space there and run the same command again: it continues from the {kept[1]} complete "
                f"shard(s) kept in {kept[0]} (or delete that directory; OUT was not written)"
            )
        raise BadInput(
            f"no space left on the device while writing the merged model: it needs {need} (see --plan), "
            f"{free / 1e9:.2f} GB are free there",
            path=parent,
            hint=hint,
        ) from exc


def _models_readable(job: Job, backend: backends.Backend) -> None:
    """The base-readable rule's last part, once the backend is known: a merge that builds a model from the base's
    config.json (rules/base_config.py) refuses one the installed transformers cannot read, before any work."""
    if backend.builds_models():
        with rule("base-readable"):
            base_config.transformers_reads(job.base_dir)


def plan(job: Job) -> dict:
    """What `merge` would do, read from headers and configs only: nothing is loaded or written."""
    backend, reason = backends.choose(job, job.sources[0].files)
    _models_readable(job, backend)
    free = available_memory()
    memory = {"free_now": free, **backend.estimate_peak_memory(free)}
    if memory["bytes"] and job.combination is not None:  # combining holds the base in float32 with every adapter
        numel = job.base_numel or 0
        adapters = sum(s.files.weight_file.stat().st_size for s in job.sources)
        memory["bytes"] = max(memory["bytes"], numel * 4 + adapters * 2)
    probes = probe_inputs(job.base_config)
    combining = (
        [f"the combined adapter against what {job.combination.type} of the adapters means"] if job.combination else []
    )
    return {
        "status": "planned",
        "versions": loading.versions(),
        "base": {
            **_base_report(job),
            "stored_dtype": _dtype_name(job.stored_dtype),
            "parameters": job.base_numel,
        },
        "adapters": job.adapters_report(),
        **({"combination": job.combination.report()} if job.combination else {}),
        "backend": backend.name,
        "backend_reason": reason,
        "dtype": _dtype_name(job.dtype),
        "output": {
            "path": str(job.out),
            "estimated_bytes": _size(job),
            "max_shard_size": job.request.max_shard_size,
            "card": job.request.card,
            "written": False,
        },
        **_push_plan(job.request),
        "peak_memory_estimate": memory,
        **(
            {"workers": backend.workers() if not job.request.ray else f"Ray ({job.request.ray})"}
            if hasattr(backend, "workers")
            else {}
        ),  # fmt: skip
        "checks": [
            *combining,
            "ledger of every adapter tensor",
            *backend.checks(),
            f"outputs against the unmerged PeftModel on {', '.join(probes) if probes else 'no probe: a gap'}",
        ],
        "quantization": _quantization(job),
        "warnings": pairs.declared_warnings() + job.revision_notes(),
        "seconds": round(time.monotonic() - job.started, 3),
        "exit_code": 0,
    }


def _push_plan(request: MergeRequest) -> dict:
    return {"push": {"repo_id": request.push_to_hub, "private": request.private}} if request.push_to_hub else {}


def _base_report(job: Job) -> dict:
    origin = job.base.origin
    hub_entry = {"hub": origin.report()} if origin else {}
    return {"path": str(job.base_dir), **hub_entry, "class": loading.class_name(job.base_config)}


def _size(job: Job) -> int | None:
    if job.quant is not None and job.quant.stored is not None:  # codes are not floating: the codec counts
        config = json.loads((job.base_dir / "config.json").read_text(encoding="utf-8"))
        view = open_checkpoint(job.base_dir, config, job.dtype)
        return view.stored.total_bytes() if job.policy == "requantize" else view.total_bytes()
    numel = job.base_numel
    return numel * torch.tensor([], dtype=job.dtype).element_size() if numel else None


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _quantization(job: Job) -> dict | None:
    return None if job.quant is None else {**job.quant.report(), "policy": job.policy}


def _rank(adapter: AdapterFiles) -> int | None:
    ranks = [int(t.shape[0]) for k, t in adapter.tensors.items() if k.endswith(("lora_A.weight", "lora_embedding_A"))]
    return max(ranks, default=None)


class _Abandon(Exception):
    """Leaves the staging block without publishing; carries the report out."""

    def __init__(self, report: dict, exit_code: int):
        super().__init__(report["status"])
        self.report = report
        self.exit_code = exit_code


def _unique(lines) -> list[str]:
    seen: dict[str, None] = {}
    for line in lines:
        seen.setdefault(line, None)
    return list(seen)
