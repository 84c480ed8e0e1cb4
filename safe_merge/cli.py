"""The safe-merge command: argparse and thin handlers over the Python API (safe_merge/api.py).

Exit codes: 0 ok · 1 verification failed · 2 bad input or refused · 3 could not verify · 4 written and verified,
the upload to the hub failed · 128 + the signal's number when interrupted (130 SIGINT, 143 SIGTERM, 129 SIGHUP).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from safe_merge import api
from safe_merge.errors import EXIT_BAD_INPUT, SafeMergeError
from safe_merge.io import staging
from safe_merge.io.signals import HANDLED, Interrupted, handle_signals

EXIT_CODES = (
    "exit codes: 0 ok · 1 verification failed · 2 bad input or refused · 3 could not verify · "
    "4 written and verified, the upload to the hub failed · 130/143/129 interrupted by SIGINT/SIGTERM/SIGHUP"
)
EXAMPLES = {
    "merge": [
        "safe-merge merge ./base ./adapter -o ./merged",
        "safe-merge merge ./base ./adapter -o ./merged --plan           # say what would happen, write nothing",
        "safe-merge merge ./adapter -o ./merged     # the base the adapter names (base_model_name_or_path)",
        "safe-merge merge ./base ./a1 ./a2 --weights 0.7 0.3 --combination linear -o ./merged",
        "safe-merge merge org/base org/lora -o ./merged --push-to-hub org/merged   # hub in, hub out",
    ],
    "push": ["safe-merge push ./merged org/merged --private   # upload a published OUT (again)"],
    "verify": ["safe-merge verify ./base ./adapter ./merged --json"],
    "inspect": ["safe-merge inspect ./adapter --target 0.7.1"],
    "migrate": ["safe-merge migrate ./adapter -o ./adapter-0.7 --target 0.7.1"],
    "fingerprint": ["safe-merge fingerprint ./base ./adapter -o adapter.fp.json"],
    "check": ["safe-merge check adapter.fp.json            # after an upgrade: exit 0, or 1 naming what moved"],
    "demo": ["safe-merge demo -o ./demo                    # offline: a tiny model, an adapter, a verified merge"],
    "env": ["safe-merge env                              # versions, known bugs, what the libraries declare"],
}


def _epilog(*commands: str) -> str:
    lines = ["examples:"] + [f"  {line}" for c in commands for line in EXAMPLES[c]]
    return "\n".join([*lines, "", EXIT_CODES])


def _command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=_epilog(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safe-merge",
        description="Turn PEFT LoRA adapters into standalone models, and prove the merge is right.",
        epilog=_epilog(*EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = _command(sub, "merge", "merge a LoRA adapter into its base, verify, write a standalone model")
    merge.add_argument(
        "models",
        nargs="+",
        metavar="[BASE] ADAPTER",
        help="the base model, then one or more adapters: local directories or hub repo ids (ID@REVISION pins "
        "one); with a single one, the adapter alone, and the base it names (adapter_config.json's "
        "base_model_name_or_path)",
    )
    merge.add_argument("-o", "--out", required=True, type=Path, help="output directory (written only when verified)")
    merge.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="auto keeps the base's"
    )
    merge.add_argument(
        "--backend",
        default="auto",
        metavar="auto|stream|peft",
        help="stream: tensor by tensor, memory bounded by the largest tensor; peft: load the model and "
        "merge_and_unload; auto (default): the first backend that handles every part of the merge",
    )
    _check_outputs(merge, "stream backend: ", "; the PEFT backend always does")
    merge.add_argument(
        "--rounding",
        choices=("default", "peft-safe"),
        default="default",
        help="whose bits to write in bfloat16/float16: merge_and_unload()'s (default: the delta added in float32, "
        "rounded once) or merge_and_unload(safe_merge=True)'s (the delta rounded first, then the sum)",
    )
    merge.add_argument(
        "--max-shard-size",
        default=None,
        help="largest safetensors shard (default: the base's shards with --backend stream, else 5GB)",
    )
    merge.add_argument(
        "--workers",
        default="auto",
        help="stream backend: processes merging output shards at once (default auto: one per 4 cores while memory "
        "allows, one for outputs under a GiB); the result is the same bytes whatever the number",
    )
    merge.add_argument(
        "--device",
        default="cpu",
        help="stream backend: where the merge's arithmetic runs: cpu (default: bit for bit merge_and_unload() on a "
        "CPU), cuda, cuda:N, or auto (a GPU where torch sees one); the checks always run on the CPU",
    )
    merge.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="stream backend: run the workers as Ray tasks on the cluster at ADDRESS (or 'local': start one here); "
        "the inputs and OUT must be on a filesystem every node shares (pip install 'safe-merge[ray]')",
    )
    merge.add_argument("--force", action="store_true", help="replace an existing OUT, only after success")
    merge.add_argument("--plan", action="store_true", help="print what would be done; write nothing")
    merge.add_argument(
        "--quantized",
        choices=("dequantize", "requantize", "refuse"),
        default="dequantize",
        help="a quantized base: merge into its dequantized weights and write a float model (default, exact), "
        "merge into the quantized layers and keep them quantized (rounds again; measured; a format read as stored "
        "is written back in that format), or refuse",
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
    merge.add_argument(
        "--report",
        type=Path,
        help="also write the JSON report here (with OUT when it is published; outside every input; an existing "
        "file only with --force)",
    )
    hub = merge.add_argument_group("the hub")
    hub.add_argument("--revision", help="hub adapters without their own @REVISION: this branch, tag or commit")
    hub.add_argument(
        "--base-revision", help="a hub base: this revision (default: the one adapter_config.json names, else main)"
    )
    hub.add_argument(
        "--push-to-hub", metavar="REPO", help="after verification passed and OUT was written, upload OUT to REPO"
    )
    hub.add_argument("--private", action="store_true", help="create the --push-to-hub repo private")
    merge.add_argument("--no-card", action="store_true", help="write no README.md (model card) into OUT")
    merge.add_argument("--json", action="store_true", help="print the JSON report on stdout")

    verify = _command(sub, "verify", "check a merged checkpoint against its base and adapter")
    verify.add_argument(
        "models",
        nargs="+",
        metavar="[BASE] ADAPTER MERGED",
        help="the base model, the adapter, the merged model; without BASE, the base the adapter names",
    )
    _check_outputs(verify, "", "; the weight checks stand alone")
    verify.add_argument("--json", action="store_true")

    inspect = _command(sub, "inspect", "origin release, features, and how each key fares in a target release")
    inspect.add_argument("adapter")
    inspect.add_argument("--target", help="PEFT release to assess for (default: the installed one)")
    inspect.add_argument("--json", action="store_true")

    migrate = _command(sub, "migrate", "write a copy of an adapter that a target PEFT release loads")
    migrate.add_argument("adapter")
    migrate.add_argument("-o", "--out", required=True, type=Path)
    migrate.add_argument("--target", help="PEFT release to migrate to (default: the installed one)")
    migrate.add_argument("--plan", action="store_true", help="print the plan and write nothing")
    migrate.add_argument("--force", action="store_true", help="replace an existing OUT, only after success")
    migrate.add_argument("--json", action="store_true")

    fingerprint = _command(
        sub, "fingerprint", "record what an adapter does on its base here, to check after a PEFT upgrade"
    )
    fingerprint.add_argument("base")
    fingerprint.add_argument("adapter")
    fingerprint.add_argument("-o", "--out", required=True, type=Path, help="the fingerprint file (JSON)")
    fingerprint.add_argument("--force", action="store_true", help="replace an existing file")
    fingerprint.add_argument("--json", action="store_true")

    check = _command(sub, "check", "recompute a fingerprint here: exit 0 when nothing moved, 1 with what did")
    check.add_argument("fingerprint", type=Path)
    check.add_argument("--base", help="the base model (default: where the fingerprint says)")
    check.add_argument("--adapter", help="the adapter (default: where the fingerprint says)")
    check.add_argument("--json", action="store_true")

    push = _command(sub, "push", "upload a merged OUT to a hub repo (created if missing; a rerun sends only changes)")
    push.add_argument("out", type=Path, help="the directory a merge published")
    push.add_argument("repo", help="the hub repo (org/name)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--json", action="store_true")

    demo = _command(sub, "demo", "build a tiny model and adapter offline and run the whole pipeline")
    demo.add_argument("-o", "--out", type=Path, help="keep the demo's files here (default: a temp dir)")
    demo.add_argument("--force", action="store_true", help="replace an existing OUT, only after success")
    demo.add_argument("--json", action="store_true")

    env = _command(
        sub, "env", "installed versions, what the history table knows of them, known bugs and declared conflicts"
    )
    env.add_argument("--json", action="store_true")
    return parser


def cmd_merge(args) -> dict:
    base, adapters = (None, args.models) if len(args.models) == 1 else (args.models[0], args.models[1:])
    return api.merge(
        base,
        adapters,
        args.out,
        dtype=args.dtype,
        backend=args.backend,
        force=args.force,
        max_shard_size=args.max_shard_size,
        plan=args.plan,
        combination=args.combination,
        weights=args.weights,
        density=args.density,
        majority_sign=args.majority_sign,
        svd_rank=args.svd_rank,
        quantized=args.quantized,
        check_outputs=args.check_outputs,
        rounding=args.rounding,
        report=args.report,
        revision=args.revision,
        base_revision=args.base_revision,
        card=not args.no_card,
        push_to_hub=args.push_to_hub,
        private=args.private,
        workers=_workers(args.workers),
        ray=args.ray,
        device=args.device,
    )


def _workers(text: str) -> int | None:
    from safe_merge.errors import BadInput

    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise BadInput(f"--workers {text!r}: give a number of processes, or auto") from None


def cmd_verify(args) -> dict:
    from safe_merge.errors import BadInput

    if len(args.models) not in (2, 3):
        raise BadInput("verify takes [BASE] ADAPTER MERGED (one adapter in this release)")
    base = args.models[0] if len(args.models) == 3 else None  # without it, the base the adapter names
    return api.verify(base, *args.models[-2:], check_outputs=args.check_outputs)


def _check_outputs(parser: argparse.ArgumentParser, before: str, after: str) -> None:
    """--check-outputs, as merge and verify both take it."""
    parser.add_argument(
        "--check-outputs",
        choices=("auto", "always", "never"),
        default="auto",
        help=f"{before}compare the merged model's outputs with the unmerged model's when both fit in free memory "
        f"(auto), always, or never{after}",
    )


def cmd_demo(args) -> dict:
    from safe_merge.demo import run_demo

    return run_demo(args.out, force=args.force)


HANDLERS = {
    "merge": cmd_merge,
    "verify": cmd_verify,
    "inspect": lambda args: api.inspect(args.adapter, target=args.target),
    "migrate": lambda args: api.migrate(args.adapter, args.out, target=args.target, plan=args.plan, force=args.force),
    "fingerprint": lambda args: api.fingerprint(args.base, args.adapter, args.out, force=args.force),
    "check": lambda args: api.check(args.fingerprint, base=args.base, adapter=args.adapter),
    "push": lambda args: api.push(args.out, args.repo, private=args.private),
    "demo": cmd_demo,
    "env": lambda args: api.env(),
}


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


def _emit(command: str, report: dict, as_json: bool) -> int:
    from safe_merge.report import summarize

    print(summarize(command, report), file=sys.stderr)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    return int(report.get("exit_code", 0))


def main(argv: list[str] | None = None) -> int:
    with handle_signals():
        staging.forget_published()
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        try:
            report = HANDLERS[args.command](args)
            return _emit(args.command, report, args.json)
        except SafeMergeError as exc:
            return _fail(args, str(exc), exc.exit_code, exc.rule)
        except Interrupted as exc:
            return _fail(args, _interrupted(exc.name), exc.exit_code)
        except KeyboardInterrupt:
            return _fail(args, _interrupted("SIGINT"), 130)
        except OSError as exc:  # a read-only target, a vanished file: nothing was published
            where = exc.filename or "a file"
            return _fail(args, f"cannot read or write {where}: {exc.strerror or exc}; {_written()}", EXIT_BAD_INPUT)
        except Exception as exc:  # an input we did not foresee: say so plainly, traceback only on request
            if os.environ.get("SAFE_MERGE_DEBUG"):
                traceback.print_exc()
            message = f"unexpected error: {type(exc).__name__}: {exc} (set SAFE_MERGE_DEBUG=1 for a traceback)"
            return _fail(args, message, EXIT_BAD_INPUT)


def _interrupted(signal_name: str) -> str:
    return f"interrupted by {signal_name}; {_written()}, temporary files removed"


def _written() -> str:
    """Whether anything was published before the command stopped; said truthfully either way."""
    done = [p for p in staging.published() if os.path.exists(p)]  # the demo publishes inside its own staging
    return f"{', '.join(done)} had been written completely before it stopped" if done else "nothing was written"


def _fail(args, message: str, code: int, rule: str | None = None) -> int:
    print(f"safe-merge {args.command}: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"status": "error", "error": message, "exit_code": code, **({"rule": rule} if rule else {})}))
    return code


def entry() -> None:
    """The console script: main, then an exit no signal can turn into a traceback (the outcome is decided, and
    was said; a late Ctrl-C would otherwise interrupt the libraries' exit handlers)."""
    code = main()
    for handled in HANDLED:
        signal.signal(handled, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
