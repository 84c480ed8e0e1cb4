"""A short human summary of a report, for stderr."""

from __future__ import annotations

import json


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _size(n) -> str:
    if not n:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summarize(command: str, report: dict) -> str:
    """A report as the few lines a person reads on stderr: the verdict, then each section the report has."""
    lines = [
        f"safe-merge {command}: {str(report.get('status')).upper()}  (exit {report.get('exit_code', '?')}"
        + (f", {report['seconds']:.1f} s)" if "seconds" in report else ")")
    ]
    sections = (
        (_regression_lines,) if command in ("fingerprint", "check") else (_env_lines,) if command == "env" else SECTIONS
    )
    for section in sections:
        lines += section(command, report)
    return "\n".join(lines)


def _origin_lines(command: str, report: dict) -> list[str]:
    """inspect: where the adapter comes from, and how each key fares in the target release."""
    lines: list[str] = []
    origin = report.get("origin") if command == "inspect" else None
    if origin:
        lines.append(f"  adapter   {report['path']} ({report['peft_type']}, {report['weight_file']})")
        created = f"; config says created by {origin['peft_version']}" if origin.get("peft_version") else ""
        lines.append(f"  origin    {origin['range']}{created}")
        for why in origin.get("evidence", []):
            lines.append(f"            because {why}")
        lines.append(f"  features  {', '.join(report.get('features') or ['plain LoRA'])}")
        keys = report.get("keys", {})
        lines.append(
            f"  target    {report['target']}: {len(keys.get('keep', []))} keys load as they are, "
            f"{len(keys.get('strip', []))} stripped, {len(keys.get('refuse', []))} refused, "
            f"{len(keys.get('unknown', []))} unknown"
        )
        for action in ("strip", "refuse", "unknown"):
            for row in keys.get(action, []):
                first = f" (first in {row['first']})" if row.get("first") else ""
                lines.append(f"  {action:9s} {row['key']} = {json.dumps(row['value'])}{first}: {row['reason']}")
    return lines


def _migration_lines(command: str, report: dict) -> list[str]:
    """inspect and migrate: the migration steps, and what is refused."""
    lines: list[str] = []
    plan = report.get("plan") if command == "inspect" else report if command == "migrate" else None
    if command == "migrate":
        lines.append(f"  adapter   {report['source']} (written by PEFT {report['origin']}) → PEFT {report['target']}")
    if plan:
        for step in plan.get("steps", []):
            lines.append(f"  step      {step['id']}: {step['note']}")
        for r in plan.get("refusals", []):
            first = f" (first understood by {r['first']})" if r.get("first") else ""
            lines.append(f"  REFUSED   {r['key']} = {json.dumps(r['value'])}: {r['reason']}{first}")
    return lines


def _input_lines(command: str, report: dict) -> list[str]:
    """merge: the base and each adapter, with its origin and migrations."""
    lines: list[str] = []
    base = report.get("base")
    if base:
        lines.append(f"  base      {_where(base)} ({base.get('class')})")
    for adapter in report.get("adapters", []):
        migrations = ", ".join(m["id"] for m in adapter.get("migrations", [])) or "none"
        weight = f"weight {adapter['weight']:g}; " if adapter.get("weight") is not None else ""
        lines.append(
            f"  adapter   {_where(adapter)} ({weight}origin peft {adapter.get('origin_peft') or 'unknown'}; "
            f"migrations: {migrations})"
        )
    return lines


def _where(entry: dict) -> str:
    """A local input by its path; a hub input by repo and commit."""
    hub = entry.get("hub")
    return f"{hub['repo_id']}@{hub['commit'][:12]} (hub)" if hub else entry["path"]


def _combination_lines(command: str, report: dict) -> list[str]:
    """merge: how several adapters are combined."""
    lines: list[str] = []
    combination = report.get("combination")
    if combination:
        options = ", ".join(
            f"{k} {combination[k]}" for k in ("density", "majority_sign", "svd_rank") if k in combination
        )
        rank = f" → one adapter of rank {combination['combined_rank']}" if combination.get("combined_rank") else ""
        lines.append(
            f"  combine   {combination['type']} of {len(combination['weights'])} adapters"
            f"{' (' + options + ')' if options else ''}{rank}"
        )
    return lines


def _backend_lines(command: str, report: dict) -> list[str]:
    """merge: which backend, why, in which dtype; the quantization policy."""
    lines: list[str] = []
    if "backend" in report:
        reason = f" ({report['backend_reason']})" if report.get("backend_reason") else ""
        lines.append(f"  backend   {report['backend']}{reason}   dtype {report.get('dtype')}")
    quant = report.get("quantization")
    if quant:
        scheme = f", {quant['scheme']}" if quant.get("scheme") else ""
        lines.append(
            f"  quantized {quant['method']}, {quant.get('bits') or '?'}-bit{scheme}: {quant['modules']} layers; "
            f"--quantized {quant['policy']}"
        )
    return lines


def _check_lines(command: str, report: dict) -> list[str]:
    """merge and verify: the ledger, each check's figures, problems and gaps."""
    lines: list[str] = []
    ledger = report.get("ledger")
    if ledger:
        lines.append(
            "  ledger    "
            + " · ".join(
                f"{k} {ledger.get(k, 0)}" for k in ("merged", "replaced", "skipped", "unmatched", "unverified")
            )
        )
    ver = report.get("verification") or {}
    w = ver.get("weights")
    if w:
        exact = w.get("exact") or {}
        if exact or w.get("tolerance_only"):
            paths = ", ".join(f"{n} {label}" for label, n in exact.items()) or "none"
            read = f"; read {report['weights_read']}" if report.get("weights_read") else ""
            lines.append(f"  exact     {paths}; within tolerance, not exact: {w.get('tolerance_only', 0)}{read}")
        lines.append(
            f"  weights   {'ok' if w['passed'] else 'FAILED'}: max |residual| {_num(w['max_abs'])}, "
            f"max rel {_num(w['max_rel'])}; worst {w.get('worst_tensor')} at {_num(w.get('worst_ratio'))}"
            f"x tolerance ({w.get('tol_rule')})"
        )
        lean = w.get("systematic") or {}
        if lean.get("tensors"):
            lines.append(
                f"  lean      {lean['tensors']} tolerance-only tensors: z {lean['z']}, scale error "
                f"{lean['scale_error']:+.2e}; a scale error above {_num(lean['smallest_scale_error_seen'])} "
                "would have been seen"
            )
    c = ver.get("combination")
    if c:
        kept = c.get("kept_share")
        detail = (
            "every entry a masked combination of the adapters'; kept "
            + ", ".join(f"{v:.1%} of adapter {i}" for i, v in kept.items())
            if kept
            else f"worst {c.get('worst_module')} at {_num(c.get('worst_ratio'))}x tolerance"
        )
        lines.append(
            f"  combined  {'ok' if c['passed'] else 'FAILED'} against what {c['type']} of the adapters means, "
            f"{c['modules_checked']} modules: {detail}"
        )
    o = ver.get("outputs")
    if o:
        if o.get("ran"):
            lines.append(
                f"  outputs   {'ok' if o['passed'] else 'FAILED'}: max |diff| {_num(o['max_abs'])} "
                f"(tol {_num(o['tol'])}; the adapter moves outputs by {_num(o.get('adapter_effect'))})"
            )
        else:
            lines.append(f"  outputs   not checked: {o.get('reason')}")
    for problem in report.get("problems", []):
        lines.append(f"  PROBLEM   {problem}")
    for gap in report.get("gaps", []):
        lines.append(f"  gap       {gap}")
    return lines


def _outcome_lines(command: str, report: dict) -> list[str]:
    """merge: what --plan would do, or what was written; the warnings."""
    lines: list[str] = []
    estimate = report.get("peak_memory_estimate")
    if estimate:
        out = report["output"]
        lines.append(
            f"  plan      write {_size(out.get('estimated_bytes'))} to {out['path']} "
            f"(shards ≤ {out['max_shard_size']}); peak memory ≈ {_size(estimate.get('bytes'))} "
            f"({_size(estimate.get('free_now'))} free now)"
        )
        for check in report.get("checks", []):
            lines.append(f"  check     {check}")
        for warning in report.get("warnings", []):
            lines.append(f"  warning   {warning}")
        lines.append("  written   nothing (--plan)")
        return lines
    output = report.get("output")
    if output:
        if output.get("path"):
            lines.append(f"  written   {output['path']}: {', '.join(output.get('files', []))}")
        elif output.get("not_written"):
            lines.append(f"  written   nothing ({output['not_written']})")
    for warning in report.get("warnings", []):
        lines.append(f"  warning   {warning}")
    push = report.get("push")
    if push and push.get("status") == "pushed":
        lines.append(f"  pushed    {push['url']} (commit {push.get('commit')})")
    elif push and push.get("status") == "failed":
        lines.append(f"  PUSH FAILED to {push['repo_id']}: {push['error'].splitlines()[0]}")
        lines.append(f"            {push['local']} is complete and verified; to push it again: {push['retry']}")
    return lines


def _regression_lines(command: str, report: dict) -> list[str]:
    """fingerprint / check: what was recorded where, and what moved."""
    lines = []
    versions = report.get("versions") or {}
    here = ", ".join(f"{k} {versions[k]}" for k in ("peft", "transformers", "torch") if k in versions)
    if command == "fingerprint":
        lines.append(
            f"  recorded  {report['tensors']} adapter tensors, {report['deltas']} weight changes, "
            f"outputs {report['outputs']} with {here}"
        )
        lines.append(f"  written   {report['output']}")
        return lines
    was = report.get("recorded_with") or {}
    then = ", ".join(f"{k} {was[k]}" for k in ("peft", "transformers", "torch") if k in was)
    lines.append(f"  recorded  with {then}")
    lines.append(f"  now       with {here}; migrations: {', '.join(report.get('migrations') or []) or 'none'}")
    if "tensors" in report:
        lines.append(f"  tensors   {report['tensors']['checked']} adapter tensors compared by hash")
        worst = report["deltas"].get("worst")
        detail = (
            f"; worst {worst['name']}: norm {worst['now']:.6g} vs {worst['recorded']:.6g} "
            f"(diff {_num(worst['diff'])}, tol {_num(worst['tol'])})"
            if worst
            else ""
        )
        lines.append(f"  deltas    {report['deltas']['checked']} weight changes{detail}")
        o = report.get("outputs") or {}
        if o:
            lines.append(f"  outputs   max |diff| {_num(o['max_abs'])} (tol {_num(o['tol'])})")
    for problem in report.get("problems", []):
        lines.append(f"  MOVED     {problem}")
    for note in report.get("notes", []):
        lines.append(f"  note      {note}")
    return lines


def _env_lines(command: str, report: dict) -> list[str]:
    """env: the versions, what the history table knows, then what needs attention."""
    versions = report.get("versions") or {}
    lines = ["  " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)]
    history = report.get("history") or {}
    known = "known to" if history.get("installed_peft_known") else "OUTSIDE"
    lines.append(
        f"  history   PEFT {versions.get('peft')} {known} the history table ({history.get('oldest')} to "
        f"{history.get('newest')}; {history.get('config_keys', 0)} config keys)"
    )
    lines.append(f"  import    peft: {report.get('peft_imports')}")
    for item in report.get("attention", []):
        lines.append(f"  ATTENTION {item}")
    return lines


SECTIONS = (
    _origin_lines,
    _migration_lines,
    _input_lines,
    _combination_lines,
    _backend_lines,
    _check_lines,
    _outcome_lines,
)
