"""Collects the verifier's figures across a test run, so the suite can print what it measured. Under pytest-xdist
each worker hands its figures to the controller (``dump`` / ``absorb``, wired in tests/conftest.py)."""

from __future__ import annotations

from collections import defaultdict

_rows: dict[str, list[dict]] = defaultdict(list)
_overflows = [0]
_identical = [0, 0]  # merges compared between the backends, tensors found bit-identical
_combinations: dict[str, list[dict]] = defaultdict(list)
_quantized: dict[tuple[str, str], list[dict]] = defaultdict(list)


def count_overflow() -> None:
    """A draw whose unmerged model overflowed (its verdict was 'could not verify')."""
    _overflows[0] += 1


def count_bit_identical(tensors: int) -> None:
    """A stream-backend merge found bit-identical to the PEFT backend's, tensor by tensor."""
    _identical[0] += 1
    _identical[1] += tensors


def record(dtype: str, arch: str, report: dict) -> None:
    """Keep the weight and output figures of one verification report."""
    w = report["verification"]["weights"]
    o = report["verification"]["outputs"]
    _rows[dtype].append(
        {
            "arch": arch,
            "weight_ratio": w["worst_ratio"],
            "weight_rel": w["max_rel"],
            "weight_abs": w["max_abs"],
            "out_abs": o.get("max_abs", 0.0),
            "out_ratio": (o.get("max_abs", 0.0) / o["tol"]) if o.get("tol") else 0.0,
            "effect_ratio": (o.get("adapter_effect", 0.0) / o["tol"]) if o.get("tol") else 0.0,
            "discriminating": bool(o.get("discriminating")),
            "noise_ratio": (o.get("max_abs", 0.0) / o["rounding_noise"]) if o.get("rounding_noise") else 0.0,
        }
    )


def record_combination(report: dict) -> None:
    """Keep the combination check's figures of one several-adapter merge, by combination type."""
    c = report["verification"]["combination"]
    _combinations[c["type"]].append(
        {"ratio": c["worst_ratio"], "abs": c["max_abs"], "kept": list((c.get("kept_share") or {}).values())}
    )


def record_quantized(backend: str, policy: str, quant: dict) -> None:
    """Keep a quantized merge's measured output error, its budget and the adapter's effect."""
    o = quant["outputs"]
    _quantized[(backend, policy)].append(
        {"bits": quant["bits"], "out": o["max_abs"], "budget": o["budget"], "effect": o["adapter_effect"]}
    )


def dump() -> dict:
    """This process's figures as plain data (what an xdist worker sends to the controller)."""
    return {
        "rows": dict(_rows),
        "overflows": _overflows[0],
        "identical": list(_identical),
        "combinations": dict(_combinations),
        "quantized": [[backend, policy, rows] for (backend, policy), rows in _quantized.items()],
    }


def absorb(data: dict) -> None:
    """Add a worker's figures to this process's."""
    for dtype, rows in data["rows"].items():
        _rows[dtype].extend(rows)
    _overflows[0] += data["overflows"]
    _identical[0] += data["identical"][0]
    _identical[1] += data["identical"][1]
    for kind, rows in data["combinations"].items():
        _combinations[kind].extend(rows)
    for backend, policy, rows in data["quantized"]:
        _quantized[(backend, policy)].extend(rows)


def table() -> list[str]:
    """One line per dtype: the worst figures seen, as multiples of the tolerance and in absolute terms."""
    lines = []
    for dtype, rows in sorted(_rows.items()):

        def worst(key: str, rows: list[dict] = rows) -> float:
            return max(r[key] for r in rows)

        lines.append(
            f"{dtype:9s} n={len(rows):4d} archs={','.join(sorted({r['arch'] for r in rows}))}  "
            f"weights: worst {worst('weight_ratio'):.3f}x tol, max |res| {worst('weight_abs'):.3g}, "
            f"max rel {worst('weight_rel'):.3g}  "
            f"outputs: worst {worst('out_ratio'):.3f}x tol, max |diff| {worst('out_abs'):.3g}, "
            f"worst diff/noise {worst('noise_ratio'):.2f}; "
            f"no-op would fail outputs in {sum(r['discriminating'] for r in rows)}/{len(rows)}"
        )
    for kind, rows in sorted(_combinations.items()):
        kept = [k for r in rows for k in r["kept"]]
        share = f", kept share {min(kept):.3f}..{max(kept):.3f}" if kept else ""
        lines.append(
            f"combination {kind:19s} n={len(rows):4d}  combined adapter: worst {max(r['ratio'] for r in rows):.3f}x "
            f"tol, max |diff| {max(r['abs'] for r in rows):.3g}{share}"
        )
    for (backend, policy), rows in sorted(_quantized.items()):
        worst = max(rows, key=lambda r: r["out"] / r["budget"])
        lines.append(
            f"quantized {backend:8s} {rows[0]['bits']}-bit {policy:10s} n={len(rows):3d}  outputs: max |diff| "
            f"{max(r['out'] for r in rows):.3g}, worst {worst['out'] / worst['budget']:.3f}x budget "
            f"({worst['out']:.3g} of {worst['budget']:.3g}; adapter effect {worst['effect']:.3g})"
        )
    if _identical[0]:
        lines.append(
            f"stream backend bit-identical to the PEFT backend: {_identical[0]} merges, {_identical[1]} tensors"
        )
    if _overflows[0]:
        lines.append(f"draws whose unmerged model overflowed (verdict could_not_verify): {_overflows[0]}")
    return lines
