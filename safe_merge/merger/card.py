"""The model card (README.md in OUT): what went in, pinned so it can be fetched again, how the merge was verified,
and the one command that reproduces it. Written after verification passed, published with OUT; the hub reads its
metadata header (base_model, base_model_relation, library_name, license, tags)."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

import yaml

from safe_merge.io.hub import is_repo_id
from safe_merge.merger.request import MergeRequest

CARD = "README.md"
TAGS = ("safe-merge", "peft", "lora", "merge")


def write_card(directory: Path, report: dict, request: MergeRequest, base_dir: Path, adapter_dirs: list[Path]) -> str:
    """Write README.md into ``directory`` (the staging copy of OUT); its file name."""
    (directory / CARD).write_text(render(report, request, base_dir, adapter_dirs), encoding="utf-8")
    return CARD


def render(report: dict, request: MergeRequest, base_dir: Path, adapter_dirs: list[Path]) -> str:
    base = report["base"]
    base_id = _base_model_id(base, base_dir, adapter_dirs)
    header: dict = {}
    if base_id:
        header["base_model"] = base_id
        header["base_model_relation"] = "merge"
    header["library_name"] = "transformers"
    license_ = license_of(base_dir)
    if license_:
        header["license"] = license_
    header["tags"] = list(TAGS)
    adapters = report["adapters"]
    names = ", ".join(f"`{input_name(a)}`" for a in adapters)
    kind = "the LoRA adapter" if len(adapters) == 1 else f"{len(adapters)} LoRA adapters"
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {_title(report, request)}",
        "",
        f"`{input_name(base)}` with {kind} {names} merged into its weights by safe-merge "
        f"{report['versions'].get('safe_merge')}, verified before it was written: {_verified(report)}.",
        "",
        "## Inputs",
        "",
        "| role | source | revision | commit or sha256 |",
        "|---|---|---|---|",
        _input_row("base", base, None),
        *(
            _input_row("adapter" if len(adapters) == 1 else f"adapter {i + 1}", a, d)
            for i, (a, d) in enumerate(zip(adapters, adapter_dirs, strict=True))
        ),
        "",
        "## Verification",
        "",
        "| check | result |",
        "|---|---|",
        *_verification_rows(report),
        "",
        "## How it was made",
        "",
        *_how_lines(report),
        "",
        "## Reproduce",
        "",
        "```",
        reproduce(report, request),
        "```",
        "",
    ]
    return "\n".join(lines)


def _verified(report: dict) -> str:
    """What the verification covered, in words: the output comparison only when it ran."""
    done = ["every adapter tensor accounted for", "every merged weight checked against the exact merge"]
    if ((report.get("verification") or {}).get("outputs") or {}).get("ran"):
        done.append("the outputs compared with the unmerged PeftModel's")
    return ", ".join(done)


def license_of(model_dir: Path) -> str | None:
    """The license the base's card declares in its metadata header, if any (read by huggingface_hub)."""
    from huggingface_hub.repocard import metadata_load

    card = model_dir / CARD
    try:
        data = metadata_load(card) if card.is_file() else None
    except Exception:  # a header that is not YAML: no license to carry
        return None
    value = (data or {}).get("license")
    return value if isinstance(value, str) else None


def _title(report: dict, request: MergeRequest) -> str:
    """The repo's name when the card goes to the hub, else OUT's."""
    if request.push_to_hub:
        return request.push_to_hub.rsplit("/", 1)[-1]
    return Path(str(report["output"]["path"])).name


def input_name(entry: dict) -> str:
    hub = entry.get("hub")
    return hub["repo_id"] if hub else Path(entry["path"]).name


def _base_model_id(base: dict, base_dir: Path, adapter_dirs: list[Path]) -> str | None:
    """The hub id the base came from; else the one the adapter names, when that is a hub id (not a path)."""
    if base.get("hub"):
        return base["hub"]["repo_id"]
    from safe_merge.compat.adapter_files import read_config

    named = read_config(adapter_dirs[0]).get("base_model_name_or_path") if adapter_dirs else None
    if isinstance(named, str) and is_repo_id(named) and not Path(named).exists():
        return named
    return None


def _input_row(role: str, entry: dict, adapter_dir: Path | None) -> str:
    hub = entry.get("hub")
    if hub:
        return f"| {role} | `{hub['repo_id']}` | {hub['revision']} | `{hub['commit']}` |"
    digest = _weights_sha256(adapter_dir) if adapter_dir is not None else None
    return f"| {role} | local `{Path(entry['path']).name}` | - | {f'`{digest}`' if digest else '-'} |"


def _weights_sha256(adapter_dir: Path) -> str | None:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = adapter_dir / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
    return None


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _verification_rows(report: dict) -> list[str]:
    ledger = report.get("ledger") or {}
    counts = ("merged", "replaced", "skipped", "unmatched", "unverified")
    rows = [
        f"| adapter tensors (ledger) | {sum(ledger.get(k, 0) for k in counts)}: "
        + ", ".join(f"{ledger.get(k, 0)} {k}" for k in counts)
        + " |"
    ]
    checks = report.get("verification") or {}
    weights = checks.get("weights")
    if weights:
        exact = weights.get("exact") or {}
        same = ", ".join(f"{n} bit-identical to {label}" for label, n in exact.items()) or "none bit-identical"
        rows.append(
            f"| merged weights | {weights.get('checked_tensors', 0)} checked: {same}; "
            f"{weights.get('tolerance_only', 0)} within tolerance only; max abs residual {_num(weights.get('max_abs'))}"
            f", max rel {_num(weights.get('max_rel'))} |"
        )
    combination = checks.get("combination")
    if combination:
        rows.append(
            f"| combined adapter | {'passed' if combination.get('passed') else 'failed'} against what "
            f"{combination.get('type')} of the adapters means, {combination.get('modules_checked')} modules |"
        )
    outputs = checks.get("outputs")
    if outputs:
        if outputs.get("ran"):
            rows.append(
                f"| outputs vs. the unmerged PeftModel | max abs difference {_num(outputs.get('max_abs'))}, tolerance "
                f"{_num(outputs.get('tol'))}; the adapter moves outputs by {_num(outputs.get('adapter_effect'))} |"
            )
        else:
            rows.append(f"| outputs vs. the unmerged PeftModel | not run: {outputs.get('reason')} |")
    config = checks.get("config")
    if config is not None:
        rows.append(f"| config.json | {config.get('changed_fields', 0)} fields changed from the base's |")
    rows += [f"| gap | {gap} |" for gap in report.get("gaps", [])]
    return rows


def _how_lines(report: dict) -> list[str]:
    versions = report.get("versions") or {}
    lines = [
        "- versions: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in versions.items() if v),
        f"- backend: {report.get('backend')}; dtype: {report.get('dtype')}",
    ]
    for i, adapter in enumerate(report["adapters"]):
        steps = ", ".join(m["id"] for m in adapter.get("migrations", [])) or "none"
        origin = adapter.get("origin_peft") or "unknown"
        lines.append(f"- adapter {i + 1}: written by PEFT {origin}; migrations: {steps}")
    combination = report.get("combination")
    if combination:
        options = ", ".join(f"{k} {v}" for k, v in combination.items() if k not in ("type", "weights"))
        lines.append(f"- combination: {combination['type']}, weights {combination['weights']}; {options}")
    quant = report.get("quantization")
    lines.append(
        f"- quantized base: {quant.get('method')}, policy {quant.get('policy')}" if quant else "- quantized base: no"
    )
    return lines


def reproduce(report: dict, request: MergeRequest) -> str:
    """The merge command that fetches the same inputs (hub ones pinned to their commits) with the same options."""

    def ref(entry: dict) -> str:
        return f"{entry['hub']['repo_id']}@{entry['hub']['commit']}" if entry.get("hub") else entry["path"]

    argv = ["safe-merge", "merge", ref(report["base"]), *(ref(a) for a in report["adapters"])]
    argv += ["-o", Path(str(report["output"]["path"])).name]
    defaults = MergeRequest(base=None, adapters=("a",), out=Path("o"))
    for option, field in (
        ("--dtype", "dtype"),
        ("--backend", "backend"),
        ("--check-outputs", "check_outputs"),
        ("--rounding", "rounding"),
        ("--max-shard-size", "max_shard_size"),
        ("--quantized", "quantized"),
        ("--device", "device"),  # a GPU's kernels may round otherwise (workers and Ray write the same bytes)
    ):
        value = getattr(request, field)
        if value != getattr(defaults, field):
            argv += [option, str(value)]
    combination = request.combination
    if combination is not None:
        argv += ["--combination", combination.type, "--weights", *(repr(float(w)) for w in combination.weights)]
        if combination.density is not None:
            argv += ["--density", repr(float(combination.density))]
        if combination.majority_sign != "total":
            argv += ["--majority-sign", combination.majority_sign]
        if combination.svd_rank is not None:
            argv += ["--svd-rank", str(combination.svd_rank)]
    return shlex.join(argv)
