"""The Python API: one function per command, each returning the report the CLI prints with --json (its
``status`` first, its ``exit_code`` last). Refusals and bad input raise a SafeMergeError carrying the exit code.

    import safe_merge
    report = safe_merge.merge("base/", ["adapter/"], "merged/")
    assert report["status"] == "passed"
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from safe_merge.errors import BadInput, SafeMergeError


def _naming_pair_bugs(command: Callable[..., dict]) -> Callable[..., dict]:
    """An error that is a known bug of the installed PEFT × transformers pair (compat/pair_bugs.json) says so,
    with the release that fixes it, instead of blaming the user's files."""

    @functools.wraps(command)
    def run(*args, **kwargs) -> dict:
        try:
            return command(*args, **kwargs)
        except SafeMergeError as exc:
            from safe_merge.compat.pairs import explain, pair_bug_message

            bug = explain(str(exc))
            if bug is None:
                raise
            raise BadInput(
                f"{pair_bug_message(bug)}. PEFT raised: {bug['symptom']}",
                path=exc.path,
                hint=f"install {bug['fixed_in']} or newer (the bug needs peft {bug['peft']} with transformers "
                f"{bug['transformers']}); `safe-merge env` lists the known bugs of the installed pair",
            ) from exc

    return run


@_naming_pair_bugs
def merge(
    base: str | Path | None,
    adapters: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    dtype: str = "auto",
    backend: str = "auto",
    force: bool = False,
    max_shard_size: str | None = None,
    plan: bool = False,
    combination: str | None = None,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    svd_rank: int | None = None,
    quantized: str = "dequantize",
    check_outputs: str = "auto",
    rounding: str = "default",
    report: str | Path | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    card: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
    workers: int | None = None,
    ray: str | None = None,
    device: str = "cpu",
) -> dict:
    """Merge one adapter (or combine several) into ``base``, verify what was written, publish ``out`` only if
    verification passed. A failed or unverifiable merge returns its report (exit_code 1 or 3), nothing written.
    ``report`` also writes the report there as JSON (with OUT when it is published). ``workers``: processes the
    stream backend merges output shards with (None: auto); ``ray``: run them as Ray tasks on that cluster
    address, or "local". ``device``: where the stream backend's arithmetic runs (cpu, cuda, cuda:N, auto).
    ``base`` None: the base the adapters name in adapter_config.json (base_model_name_or_path), as AutoPeftModel
    finds it.

    Inputs may be hub repo ids (``ID@REVISION`` pins one); ``revision`` is the adapters' revision where they name
    none, ``base_revision`` the base's (default: the revision adapter_config.json names, else main). ``card``
    writes README.md into OUT. ``push_to_hub`` uploads OUT to that repo after it was published (created, private
    if ``private``); a failed upload leaves OUT and returns exit_code 4 with the command that retries it."""
    from safe_merge.merger.pipeline import merge_command
    from safe_merge.merger.request import MergeRequest, combination_options

    adapters = [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    request = MergeRequest(
        base=None if base is None else str(base),
        adapters=tuple(str(a) for a in adapters),
        out=Path(out),
        dtype=dtype,
        backend=backend,
        force=force,
        max_shard_size=max_shard_size,
        plan=plan,
        combination=combination_options(len(adapters), combination, weights, density, majority_sign, svd_rank),
        quantized=quantized,
        check_outputs=check_outputs,
        rounding=rounding,
        report=None if report is None else Path(report),
        revision=revision,
        base_revision=base_revision,
        card=card,
        push_to_hub=push_to_hub,
        private=private,
        workers=workers,
        ray=ray,
        device=device,
    )
    return merge_command(request)


@_naming_pair_bugs
def verify(base: str | Path | None, adapter: str | Path, merged: str | Path, *, check_outputs: str = "auto") -> dict:
    """Check a merged checkpoint, whoever wrote it, against its base and adapter (ledger, weights, outputs). The
    adapter is read as `merge` reads it: migrated first where the installed PEFT or transformers needs it.
    ``base`` None: the base the adapter names (base_model_name_or_path). The weights are checked one tensor at a
    time where the stream backend could read the base; otherwise the models are loaded. ``check_outputs``: run
    the output check when the models fit in free memory (auto), always, or never (the weight checks stand alone).
    A merged directory without config.json (bare safetensors) gets the weight checks only, and says so."""
    import tempfile

    from safe_merge.compat.pairs import declared_warnings
    from safe_merge.io import loading
    from safe_merge.io.checkpoint import shard_files
    from safe_merge.io.hub import resolve
    from safe_merge.merger.backends.stream.verify import verify_checkpoint
    from safe_merge.merger.job import named_base, read_source
    from safe_merge.merger.request import OUTPUT_CHECKS
    from safe_merge.verifier.verdict import verify_dirs

    if check_outputs not in OUTPUT_CHECKS:
        raise BadInput(f"--check-outputs {check_outputs!r} is not one of {', '.join(OUTPUT_CHECKS)}")
    started = time.monotonic()
    inputs = {"adapter": resolve(adapter, "adapter")}
    adapter_dir = inputs["adapter"].path
    inputs["base"] = resolve(named_base([adapter_dir]) if base is None else base, "base model")
    inputs["merged"] = resolve(merged, "merged model")
    base_dir, merged_dir = inputs["base"].path, inputs["merged"].path
    for model_dir in (base_dir, merged_dir):
        shard_files(model_dir)  # a directory without weights is named before anything is loaded
    config = loading.read_config_json(base_dir)
    source = read_source(
        adapter_dir, loading.installed_peft(), base_class=loading.class_name(config), base_config=config.to_dict()
    )
    with tempfile.TemporaryDirectory(prefix="safe-merge-verify-") as scratch:
        migrated = source.materialize(Path(scratch) / "adapter")
        result = verify_checkpoint(base_dir, migrated, merged_dir, adapter_dir, check_outputs)
        how = "one tensor at a time"
        if isinstance(result, list):
            if not (merged_dir / "config.json").is_file():
                raise BadInput(
                    f"the merged directory has no config.json, and its weights cannot be read one tensor at a time "
                    f"({result[0]})",
                    path=merged_dir,
                    hint="copy the base's config.json beside the merged weights",
                )
            how = f"models loaded ({result[0]})"
            result = verify_dirs(base_dir, migrated, merged_dir, adapter_dir, check_outputs)
    base_info = {"path": str(base_dir), "class": loading.class_name(config)}
    report = {**result.report(), "versions": loading.versions(), "merged": str(merged_dir), "base": base_info}
    report["weights_read"] = how
    origins = {role: r.origin.report() for role, r in inputs.items() if r.origin is not None}
    if origins:
        report["hub"] = origins
    report["warnings"] = declared_warnings() + report.get("warnings", [])
    report["adapter_migrations"] = source.plan.steps
    report["seconds"] = round(time.monotonic() - started, 3)
    report["exit_code"] = result.exit_code
    return report


def push(out: str | Path, repo_id: str, *, private: bool = False) -> dict:
    """Upload a directory `merge` published (its card included) to a hub repo, created if missing; a rerun
    uploads only what changed. Exit code 4 when the upload fails."""
    from safe_merge.errors import EXIT_PUSH_FAILED
    from safe_merge.io.checkpoint import shard_files
    from safe_merge.io.hub import check_push
    from safe_merge.merger.pipeline import push_output

    out = Path(out)
    if not out.is_dir():
        raise BadInput("no such directory", path=out, hint="pass the OUT a merge published")
    shard_files(out)  # a directory without weights is named before anything is uploaded
    check_push(repo_id)
    result = push_output(out, repo_id, private)
    return {
        "status": result["status"],
        "push": result,
        "exit_code": 0 if result["status"] == "pushed" else EXIT_PUSH_FAILED,
    }


def inspect(adapter: str | Path, *, target: str | None = None) -> dict:
    """Which releases could have written the adapter, its features, and how each key fares in ``target`` (default:
    the installed PEFT)."""
    from safe_merge.compat.inspect import inspect_adapter
    from safe_merge.io import loading

    target = _release(target or loading.installed_peft())
    adapter_dir = loading.resolve_dir(adapter, "adapter")
    return {**inspect_adapter(adapter_dir, target).report(), "exit_code": 0}


def migrate(
    adapter: str | Path, out: str | Path, *, target: str | None = None, plan: bool = False, force: bool = False
) -> dict:
    """Write a copy of the adapter that ``target`` loads with the same meaning, or refuse naming the key, its value
    and the first release that understands it (nothing written)."""
    from safe_merge.compat.adapter_files import load_adapter
    from safe_merge.compat.plan import make_plan, write_state
    from safe_merge.io import loading, staging
    from safe_merge.io.output_path import check_output

    target = _release(target or loading.installed_peft())
    source = loading.resolve_dir(adapter, "adapter")
    out = check_output(Path(out), {"adapter": source}, force=force)
    migration, state = make_plan(load_adapter(source), target)
    report = {**migration.report(), "output": None, "exit_code": 0}
    if migration.refused:
        raise BadInput(
            migration.refusal_message(),
            hint="merge with a release that understands these keys, or keep "
            "the adapter on a release at least as new as the first one named",
        )
    if not plan:
        report["warnings"] = staging.sweep_stale(out.parent)
        with staging.staged(out, force) as stage:
            files = write_state(state, source, stage)
        report["output"] = {"path": str(out), "files": files}
        report["status"] = "migrated"
    return report


@_naming_pair_bugs
def fingerprint(base: str | Path, adapter: str | Path, out: str | Path, *, force: bool = False) -> dict:
    """Record what the adapter does on its base here (versions, file hashes, tensor manifest, weight changes,
    outputs) into ``out``, to check after an upgrade."""
    from safe_merge import fingerprints
    from safe_merge.io import staging
    from safe_merge.io.hub import resolve
    from safe_merge.io.output_path import check_output

    started = time.monotonic()
    resolved = (resolve(base, "base model"), resolve(adapter, "adapter"))
    inputs = {"base model": resolved[0].path, "adapter": resolved[1].path}
    out = check_output(Path(out), inputs, force=force, kind="file")  # before the work, not only after it
    stale = staging.sweep_stale(out.parent)
    recorded = fingerprints.record(str(base), str(adapter), out, resolved)
    fingerprints.write_fingerprint(recorded, out, force)
    return {
        "status": "recorded",
        "output": str(out),
        "versions": recorded["recorded_with"],
        "migrations": recorded["migrations"],
        "tensors": len(recorded["adapter"]["tensors"]),
        "deltas": len(recorded["deltas"]),
        "outputs": recorded["outputs"]["shape"],
        "warnings": stale,
        "seconds": round(time.monotonic() - started, 3),
        "exit_code": 0,
    }


@_naming_pair_bugs
def check(fingerprint: str | Path, *, base: str | Path | None = None, adapter: str | Path | None = None) -> dict:
    """Recompute a fingerprint here: status passed (exit_code 0) when nothing moved, failed (1) naming what did."""
    from safe_merge import fingerprints

    return fingerprints.check(
        Path(fingerprint), None if base is None else str(base), None if adapter is None else str(adapter)
    )


def env() -> dict:
    """The installed versions, what the history table knows of them, known bugs and what PEFT and transformers
    declare unmet here (status ok or attention; exit_code 0)."""
    from safe_merge.doctor import environment

    return environment()


def _release(release: str) -> str:
    from packaging.version import InvalidVersion, Version

    try:
        Version(release)
    except InvalidVersion as exc:
        raise BadInput(f"--target {release!r} is not a release number", hint="e.g. --target 0.7.1") from exc
    return release
