"""The safe-merge command. Exit codes: 0 ok · 1 verification failed · 2 bad input or refused · 3 could not verify."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from safe_merge.errors import EXIT_BAD_INPUT, SafeMergeError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safe-merge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base, verify, write a standalone model")
    merge.add_argument("base", help="base model: a local directory or a cached hub id")
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directory or cached hub id")
    merge.add_argument("-o", "--out", required=True, type=Path, help="output directory (written only when verified)")
    merge.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto keeps the base's stored dtype")
    merge.add_argument(
        "--backend",
        choices=("auto", "peft", "stream"),
        default="auto",
        help="stream: tensor by tensor, memory bounded by the largest tensor; peft: load the model and "
        "merge_and_unload; auto (default): stream when it handles every part of the merge",
    )
    merge.add_argument(
        "--check-outputs",
        choices=("auto", "always", "never"),
        default="auto",
        help="stream backend: compare the merged model's outputs with the unmerged model's when both fit in "
        "free memory (auto), always, or never; the PEFT backend always does",
    )
    merge.add_argument(
        "--max-shard-size",
        default=None,
        help="largest safetensors shard (default: the base's shards with --backend stream, else 5GB)",
    )
    merge.add_argument("--force", action="store_true", help="replace an existing OUT, only after success")
    merge.add_argument("--plan", action="store_true", help="print what would be done; write nothing")
    merge.add_argument(
        "--quantized",
        choices=("dequantize", "requantize", "refuse"),
        default="dequantize",
        help="a quantized base: merge into its dequantized weights and write a float model (default, exact), "
        "merge into the quantized layers and keep them quantized (rounds again; measured), or refuse",
    )
    joint = merge.add_argument_group("several adapters (PEFT's add_weighted_adapter)")
    joint.add_argument(
        "--combination",
        help="how to join several adapters: cat (default: exact, the weighted sum of their deltas), linear, svd, "
        "ties, ties_svd, dare_linear, dare_ties, magnitude_prune, magnitude_prune_svd",
    )
    joint.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per adapter (default 1 each)")
    joint.add_argument("--density", type=float, help="share of entries kept by the pruning types (0, 1]")
    joint.add_argument("--majority-sign", choices=("total", "frequency"), default="total", help="ties sign election")
    joint.add_argument("--svd-rank", type=int, help="rank of the *svd types' result (default: the largest rank)")
    merge.add_argument("--report", type=Path, help="also write the JSON report here")
    merge.add_argument("--json", action="store_true", help="print the JSON report on stdout")

    verify = sub.add_parser("verify", help="check a merged checkpoint against its base and adapter")
    verify.add_argument("base")
    verify.add_argument("rest", nargs="+", metavar="ADAPTER... MERGED", help="the adapter, then the merged model")
    verify.add_argument("--json", action="store_true")

    inspect = sub.add_parser("inspect", help="origin release, features, and how each key fares in a target release")
    inspect.add_argument("adapter")
    inspect.add_argument("--target", help="PEFT release to assess for (default: the installed one)")
    inspect.add_argument("--json", action="store_true")

    migrate = sub.add_parser("migrate", help="write a copy of an adapter that a target PEFT release loads")
    migrate.add_argument("adapter")
    migrate.add_argument("-o", "--out", required=True, type=Path)
    migrate.add_argument("--target", help="PEFT release to migrate to (default: the installed one)")
    migrate.add_argument("--plan", action="store_true", help="print the plan and write nothing")
    migrate.add_argument("--force", action="store_true", help="replace an existing OUT, only after success")
    migrate.add_argument("--json", action="store_true")

    fingerprint = sub.add_parser(
        "fingerprint", help="record what an adapter does on its base here, to check after a PEFT upgrade"
    )
    fingerprint.add_argument("base")
    fingerprint.add_argument("adapter")
    fingerprint.add_argument("-o", "--out", required=True, type=Path, help="the fingerprint file (JSON)")
    fingerprint.add_argument("--force", action="store_true", help="replace an existing file")
    fingerprint.add_argument("--json", action="store_true")

    check = sub.add_parser("check", help="recompute a fingerprint here: exit 0 when nothing moved, 1 with what did")
    check.add_argument("fingerprint", type=Path)
    check.add_argument("--base", help="the base model (default: where the fingerprint says)")
    check.add_argument("--adapter", help="the adapter (default: where the fingerprint says)")
    check.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="build a tiny model and adapter offline and run the whole pipeline")
    demo.add_argument("-o", "--out", type=Path, help="keep the demo's files here (default: a temp dir)")
    demo.add_argument("--json", action="store_true")
    return parser


def _quiet_libraries() -> None:
    """Library housekeeping (deprecations) is not news about the user's merge; PEFT's own warnings are kept in
    the report."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported, if ever
    if "transformers" in sys.modules:
        try:
            sys.modules["transformers"].logging.set_verbosity_error()
        except Exception:
            pass


def _emit(command: str, report: dict, as_json: bool, report_path: Path | None = None) -> int:
    from safe_merge.report import summarize

    text = json.dumps(report, indent=2, default=str)
    if report_path is not None:
        report_path.write_text(text + "\n", encoding="utf-8")
    print(summarize(command, report), file=sys.stderr)
    if as_json:
        print(text)
    return int(report.get("exit_code", 0))


def cmd_merge(args) -> int:
    from safe_merge.merger.pipeline import MergeRequest, merge_command
    from safe_merge.merger.rules.combinable import parse_combination

    combination = None
    joint = (args.combination, args.weights, args.density, args.svd_rank)
    if len(args.adapters) > 1 or any(x is not None for x in joint):
        combination = parse_combination(
            args.combination or "cat", args.weights, len(args.adapters), args.density, args.majority_sign, args.svd_rank
        )
    report = merge_command(
        MergeRequest(
            args.base,
            args.adapters,
            args.out,
            args.dtype,
            args.backend,
            args.force,
            args.max_shard_size,
            args.plan,
            combination,
            args.quantized,
            args.check_outputs,
        )
    )
    return _emit("merge", report, args.json, args.report)


def cmd_verify(args) -> int:
    import time

    from safe_merge.errors import BadInput
    from safe_merge.io import loading
    from safe_merge.verifier.verdict import verify_dirs

    if len(args.rest) != 2:
        raise BadInput("verify takes BASE ADAPTER MERGED (one adapter in this release)")
    started = time.monotonic()
    base = loading.resolve_dir(args.base, "base model")
    adapter = loading.resolve_dir(args.rest[0], "adapter")
    merged = loading.resolve_dir(args.rest[1], "merged model")
    result = verify_dirs(base, adapter, merged)
    report = {**result.report(), "versions": loading.versions(), "merged": str(merged)}
    report["seconds"] = round(time.monotonic() - started, 3)
    report["exit_code"] = result.exit_code
    return _emit("verify", report, args.json)


def cmd_inspect(args) -> int:
    from safe_merge.compat.inspect import inspect_adapter
    from safe_merge.io import loading

    target = args.target or loading.installed_peft()
    _check_release(target)
    adapter = loading.resolve_dir(args.adapter, "adapter")
    report = {**inspect_adapter(adapter, target).report(), "exit_code": 0}
    return _emit("inspect", report, args.json)


def cmd_migrate(args) -> int:
    from safe_merge.compat.adapter_files import load_adapter
    from safe_merge.compat.plan import make_plan, write_state
    from safe_merge.errors import BadInput
    from safe_merge.io import loading
    from safe_merge.io.staging import check_target, staged

    target = args.target or loading.installed_peft()
    _check_release(target)
    source = loading.resolve_dir(args.adapter, "adapter")
    check_target(args.out, args.force)
    plan, state = make_plan(load_adapter(source), target)
    report = {**plan.report(), "output": None, "exit_code": 0}
    if plan.refused:
        raise BadInput(
            plan.refusal_message(),
            hint="merge with a release that understands these keys, or keep "
            "the adapter on a release at least as new as the first one named",
        )
    if not args.plan:
        with staged(args.out, args.force) as stage:
            files = write_state(state, source, stage)
        report["output"] = {"path": str(args.out), "files": files}
        report["status"] = "migrated"
    return _emit("migrate", report, args.json)


def _check_release(release: str) -> None:
    from packaging.version import InvalidVersion, Version

    from safe_merge.errors import BadInput

    try:
        Version(release)
    except InvalidVersion as exc:
        raise BadInput(f"--target {release!r} is not a release number", hint="e.g. --target 0.7.1") from exc


def cmd_fingerprint(args) -> int:
    import time

    from safe_merge.fingerprints import record, write_fingerprint
    from safe_merge.io.staging import refuse_existing

    started = time.monotonic()
    refuse_existing(args.out, args.force)  # before the work, not only after it
    fingerprint = record(args.base, args.adapter, args.out)
    write_fingerprint(fingerprint, args.out, args.force)
    report = {
        "status": "recorded",
        "output": str(args.out),
        "versions": fingerprint["recorded_with"],
        "migrations": fingerprint["migrations"],
        "tensors": len(fingerprint["adapter"]["tensors"]),
        "deltas": len(fingerprint["deltas"]),
        "outputs": fingerprint["outputs"]["shape"],
        "seconds": round(time.monotonic() - started, 3),
        "exit_code": 0,
    }
    return _emit("fingerprint", report, args.json)


def cmd_check(args) -> int:
    from safe_merge.fingerprints import check

    return _emit("check", check(args.fingerprint, args.base, args.adapter), args.json)


def cmd_demo(args) -> int:
    from safe_merge.demo import run_demo

    report = run_demo(args.out)
    return _emit("demo", report, args.json)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    handlers = {
        "merge": cmd_merge,
        "verify": cmd_verify,
        "inspect": cmd_inspect,
        "migrate": cmd_migrate,
        "fingerprint": cmd_fingerprint,
        "check": cmd_check,
        "demo": cmd_demo,
    }
    try:
        return handlers[args.command](args)
    except SafeMergeError as exc:
        return _fail(args, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _fail(args, "interrupted; nothing was written", EXIT_BAD_INPUT)
    except OSError as exc:  # a full disk, a read-only target, a vanished file: nothing was published
        return _fail(
            args,
            f"cannot read or write {exc.filename or 'a file'}: {exc.strerror or exc}; nothing was written",
            EXIT_BAD_INPUT,
        )
    except Exception as exc:  # an input we did not foresee: say so plainly, traceback only on request
        if os.environ.get("SAFE_MERGE_DEBUG"):
            traceback.print_exc()
        message = f"unexpected error: {type(exc).__name__}: {exc} (set SAFE_MERGE_DEBUG=1 for a traceback)"
        return _fail(args, message, EXIT_BAD_INPUT)


def _fail(args, message: str, code: int) -> int:
    print(f"safe-merge {args.command}: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"status": "error", "error": message, "exit_code": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
