"""Collects the verifier's figures across a test run, so the suite can print what it measured."""

from __future__ import annotations

from collections import defaultdict

_rows: dict[str, list[dict]] = defaultdict(list)


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
        }
    )


def table() -> list[str]:
    lines = []
    for dtype, rows in sorted(_rows.items()):
        archs = sorted({r["arch"] for r in rows})
        lines.append(
            f"{dtype:9s} n={len(rows):4d} archs={','.join(archs)}  "
            f"weights: worst {max(r['weight_ratio'] for r in rows):.3f}x tol, "
            f"max |res| {max(r['weight_abs'] for r in rows):.3g}, max rel {max(r['weight_rel'] for r in rows):.3g}  "
            f"outputs: worst {max(r['out_ratio'] for r in rows):.3f}x tol, max |diff| {max(r['out_abs'] for r in rows):.3g}; "
            f"no-op would fail outputs in {sum(r['discriminating'] for r in rows)}/{len(rows)}"
        )
    return lines
