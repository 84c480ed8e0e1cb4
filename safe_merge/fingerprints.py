"""Regression fingerprints: what an adapter does to its base in one environment, written down so that another
environment (a PEFT or transformers upgrade, another machine) can be checked against it.

A fingerprint holds the library versions, a hash of every base and adapter file, the adapter's tensor manifest
(name, shape, dtype, hash, norm), the norm of every weight change the installed PEFT's merge makes, and the
PeftModel's outputs on a fixed probe (the probe inputs are stored too, so both sides run the same numbers).

`check` recomputes all of it where it runs. A changed adapter tensor fails naming the tensor; a weight change or
an output that moved beyond the float32 bounds below fails naming the parameter or the output position. Files
whose hash changed while every tensor and output held are reported, not failed (a re-saved base is fine).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safe_merge.compat import pairs
from safe_merge.compat.adapter_files import AdapterFiles, load_adapter
from safe_merge.compat.plan import write_state
from safe_merge.errors import EXIT_FAILED, EXIT_OK, BadInput, Unsupported
from safe_merge.io import loading, staging
from safe_merge.io.hub import Resolved, resolve
from safe_merge.merger.backends import peft as backend_peft
from safe_merge.merger.job import read_source
from safe_merge.merger.rules.known_bugs import refuse_known_bugs
from safe_merge.verifier.outputs import run
from safe_merge.verifier.probes import probe_inputs

KIND = "safe-merge fingerprint"
FORMAT = 1
SAMPLES = 512  # output entries kept (evenly spaced over the flattened output), plus every row's norm
EPS32 = torch.finfo(torch.float32).eps
# Bounds between two float32 environments. A weight change W' - W is rounded once per element in each (<= eps·|W'|)
# and B·A may be summed in another order (r·eps·|B||A|, within 2·eps·‖ΔW‖ for these ranks' norms): 8·eps·(‖W‖ +
# ‖ΔW‖) holds both with room. Outputs go through every layer, in kernels transformers changes between releases
# (attention, rotary): 1e-4 of the largest output, measured well below that (docs/fingerprints.md).
DELTA_ULPS = 8
OUTPUT_RELATIVE = 1e-4


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones aside), by relative path."""
    return {
        str(p.relative_to(directory)): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    }


def tensor_manifest(files: AdapterFiles) -> dict[str, dict]:
    out = {}
    for name, tensor in sorted(files.tensors.items()):
        data = tensor.detach().contiguous()
        raw = data.view(torch.uint8) if data.numel() else data
        out[name] = {
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
            "norm": float(data.double().norm()),
        }
    return out


def _where(given: str, resolved: Resolved, anchor: Path) -> dict:
    """How to find an input again: as given (a hub id stays one, with the commit it resolved to), and relative to
    the fingerprint's folder."""
    where = {"given": given, "relative": os.path.relpath(resolved.path.resolve(), anchor.resolve())}
    if resolved.origin is not None:
        where["hub"] = resolved.origin.report()
    return where


def _measure(base_dir: Path, source, inputs: dict[str, torch.Tensor] | None = None) -> dict:
    """Run the installed PEFT: the adapter (migrated to this release on a staging copy) on the base in float32,
    on ``inputs`` (default: the probe its config gives)."""
    inputs = inputs if inputs is not None else probe_inputs(loading.read_model_config(base_dir))
    if inputs is None:
        raise Unsupported(f"{base_dir}: the model config says too little to build probe inputs")
    with tempfile.TemporaryDirectory(prefix=".safe-merge-fingerprint-") as t:
        adapter_dir = source.path
        if source.plan.steps:
            adapter_dir = Path(t) / "migrated"
            adapter_dir.mkdir()
            write_state(source.state, source.path, adapter_dir)
        adapter = load_adapter(adapter_dir)
        try:  # a merge this release is known to get wrong or crash on cannot be fingerprinted or checked here
            model_type = getattr(loading.read_model_config(base_dir), "model_type", None)
            refuse_known_bugs(adapter, loading.installed_peft(), torch.float32, model_type)
        except BadInput as known:
            raise Unsupported(str(known)) from known
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = loading.load_model(base_dir, torch.float32)
            base = {k: v.detach().clone() for k, v in model.state_dict().items()}
            reference = loading.load_peft(copy.deepcopy(model), adapter_dir)
            outputs = run(reference, inputs).to(torch.float32)
            del reference
            merged, _ = backend_peft.merge_model(model, adapter)
    deltas = {}
    for name, value in merged.state_dict().items():
        before = base.get(name)
        if before is None or before.shape != value.shape or torch.equal(before, value):
            continue
        change = value.detach().double() - before.double()
        deltas[name] = {"norm": float(change.norm()), "base_norm": float(before.double().norm())}
    flat = outputs.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(SAMPLES, flat.numel())).round().long().unique()
    rows = outputs.reshape(outputs.shape[0], -1) if outputs.dim() > 1 else outputs.reshape(1, -1)
    return {
        "steps": source.plan.steps,
        "inputs": {k: v.tolist() for k, v in inputs.items()},
        "deltas": deltas,
        "outputs": {
            "shape": list(outputs.shape),
            "max_abs": float(outputs.abs().max()),
            "row_norms": [float(x) for x in rows.double().norm(dim=1)],
            "index": index.tolist(),
            "values": [float(x) for x in flat[index]],
        },
    }


def record(base: str, adapter: str, out: Path, inputs: tuple[Resolved, Resolved] | None = None) -> dict:
    """Build the fingerprint of ``adapter`` on ``base`` in this environment (the caller writes it to ``out``).
    ``inputs``: the two already resolved (a hub id is then not looked up twice)."""
    base_in, adapter_in = inputs or (resolve(base, "base model"), resolve(adapter, "adapter"))
    base_dir = base_in.path
    source = read_source(adapter_in.path, loading.installed_peft())
    anchor = Path(out).parent
    measured = _measure(base_dir, source)
    return {
        "kind": KIND,
        "format": FORMAT,
        "recorded_with": loading.versions(),
        "migrations": [s["id"] for s in measured.pop("steps")],
        "base": {**_where(base, base_in, anchor), "files": file_hashes(base_dir)},
        "adapter": {
            **_where(adapter, adapter_in, anchor),
            "files": file_hashes(source.path),
            "tensors": tensor_manifest(source.files),
        },
        **measured,
    }


def write_fingerprint(fingerprint: dict, out: Path, force: bool) -> None:
    """Write atomically: a complete file appears, or nothing does."""
    staging.write_file(Path(out), json.dumps(fingerprint, indent=1) + "\n", force)


def read_fingerprint(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BadInput("no such file", path=path, hint="pass a file written by `safe-merge fingerprint`") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"not JSON ({exc})", path=path, hint="pass a file written by `safe-merge fingerprint`") from exc
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise BadInput("not a safe-merge fingerprint", path=path, key="kind")
    if data.get("format") != FORMAT:
        raise BadInput(
            f"fingerprint format {data.get('format')!r}; this safe-merge reads format {FORMAT}",
            path=path,
            key="format",
            hint="record it again with this safe-merge",
        )
    return data


def _locate(entry: dict, override: str | None, anchor: Path, what: str) -> Path:
    """The input named on the command line, else where it was relative to the fingerprint, else as given."""
    if override is not None:
        return loading.resolve_dir(override, what)
    relative = anchor / entry["relative"]
    if relative.is_dir():
        return relative
    hub = entry.get("hub")
    return loading.resolve_dir(f"{hub['repo_id']}@{hub['commit']}" if hub else entry["given"], what)


@dataclass
class Comparison:
    """Everything that moved, in the order a person would look: tensors, weight changes, outputs."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tensors_checked: int = 0
    deltas_checked: int = 0
    worst_delta: dict | None = None
    outputs: dict = field(default_factory=dict)


def compare_tensors(recorded: dict, now: dict, c: Comparison) -> None:
    """Adapter tensors by hash: gone, new, reshaped or changed (with the change of their norm)."""
    for name, was in recorded.items():
        got = now.get(name)
        if got is None:
            c.problems.append(f"adapter tensor {name} is gone")
            continue
        c.tensors_checked += 1
        if (got["shape"], got["dtype"]) != (was["shape"], was["dtype"]):
            c.problems.append(
                f"adapter tensor {name} changed from {was['dtype']}{was['shape']} to {got['dtype']}{got['shape']}"
            )
        elif got["sha256"] != was["sha256"]:
            change = (got["norm"] - was["norm"]) / was["norm"] if was["norm"] else math.inf
            c.problems.append(
                f"adapter tensor {name} changed: norm {was['norm']:.6g} → {got['norm']:.6g} ({change:+.2%})"
            )
    for name in sorted(set(now) - set(recorded)):
        c.problems.append(f"adapter tensor {name} is new (not in the fingerprint)")


def compare_deltas(recorded: dict, now: dict, c: Comparison) -> None:
    """The norm of each weight change the merge makes, within float32 rounding of ‖W‖ + ‖ΔW‖."""
    worst = None
    for name, was in recorded.items():
        got = now.get(name)
        if got is None:
            c.problems.append(f"the merge no longer changes {name} (it changed by norm {was['norm']:.6g})")
            continue
        c.deltas_checked += 1
        diff = abs(got["norm"] - was["norm"])
        tol = DELTA_ULPS * EPS32 * (was["base_norm"] + was["norm"])
        row = {"name": name, "recorded": was["norm"], "now": got["norm"], "diff": diff, "tol": tol}
        if worst is None or diff / tol > worst["diff"] / worst["tol"]:
            worst = row
        if diff > tol:
            c.problems.append(
                f"the merge changes {name} by norm {got['norm']:.6g}, recorded {was['norm']:.6g} "
                f"(diff {diff:.3g} > tol {tol:.3g})"
            )
    for name in sorted(set(now) - set(recorded)):
        c.problems.append(f"the merge now changes {name} (norm {now[name]['norm']:.6g}), which it did not")
    c.worst_delta = worst


def compare_outputs(recorded: dict, now: dict, c: Comparison) -> None:
    """The sampled outputs and every row's norm, within 1e-4 of the largest recorded output."""
    if now["shape"] != recorded["shape"]:
        c.problems.append(f"outputs have shape {now['shape']}, recorded {recorded['shape']}")
        return
    tol = OUTPUT_RELATIVE * max(recorded["max_abs"], 1e-6)
    diffs = [abs(a - b) for a, b in zip(now["values"], recorded["values"], strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__) if diffs else None
    row_diffs = [abs(a - b) for a, b in zip(now["row_norms"], recorded["row_norms"], strict=True)]
    row_tol = OUTPUT_RELATIVE * max(max(recorded["row_norms"], default=0.0), 1e-6)
    c.outputs = {
        "max_abs": max(diffs, default=0.0),
        "tol": tol,
        "row_norm_max_abs": max(row_diffs, default=0.0),
        "row_norm_tol": row_tol,
    }
    if worst is not None and diffs[worst] > tol:
        position = _unravel(recorded["index"][worst], recorded["shape"])
        c.problems.append(
            f"output {position} is {now['values'][worst]:.6g}, recorded {recorded['values'][worst]:.6g} "
            f"(diff {diffs[worst]:.3g} > tol {tol:.3g})"
        )
    elif max(row_diffs, default=0.0) > row_tol:
        row = max(range(len(row_diffs)), key=row_diffs.__getitem__)
        c.problems.append(
            f"output row {row} has norm {now['row_norms'][row]:.6g}, recorded {recorded['row_norms'][row]:.6g}"
        )


def _unravel(flat: int, shape: list[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def check(path: Path, base: str | None = None, adapter: str | None = None) -> dict:
    """Recompute the fingerprint at ``path`` here; the report's status is passed, failed or could_not_check."""
    started = time.monotonic()
    recorded = read_fingerprint(path)
    anchor = Path(path).parent
    base_dir = _locate(recorded["base"], base, anchor, "base model")
    adapter_dir = _locate(recorded["adapter"], adapter, anchor, "adapter")
    report = {
        "status": None,
        "fingerprint": str(path),
        "recorded_with": recorded["recorded_with"],
        "versions": loading.versions(),
        "base": str(base_dir),
        "adapter": str(adapter_dir),
    }
    c = Comparison()
    # an adapter this release cannot load (a key it lacks would change the math) cannot be checked here: exit 3
    source = read_source(adapter_dir, loading.installed_peft(), refusal=Unsupported)
    compare_tensors(recorded["adapter"]["tensors"], tensor_manifest(source.files), c)
    measured = _measure(base_dir, source, {k: torch.tensor(v) for k, v in recorded["inputs"].items()})
    compare_deltas(recorded["deltas"], measured["deltas"], c)
    compare_outputs(recorded["outputs"], measured["outputs"], c)
    for what, entry, directory in (("base", recorded["base"], base_dir), ("adapter", recorded["adapter"], adapter_dir)):
        changed = sorted(k for k, v in file_hashes(directory).items() if entry["files"].get(k) != v)
        if changed:
            c.notes.append(f"{what} files differ from the recorded ones: {', '.join(changed[:5])}")
    c.notes += pairs.declared_warnings()
    status = "failed" if c.problems else "passed"
    report.update(
        status=status,
        migrations=[s["id"] for s in measured["steps"]],
        tensors={"checked": c.tensors_checked},
        deltas={"checked": c.deltas_checked, "worst": c.worst_delta},
        outputs=c.outputs,
        problems=c.problems,
        notes=c.notes,
        seconds=round(time.monotonic() - started, 3),
        exit_code=EXIT_FAILED if c.problems else EXIT_OK,
    )
    return report
