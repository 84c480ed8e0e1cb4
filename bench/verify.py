"""Benchmark: `safe-merge verify` beside a peer verifier (deltalint) on the same merged checkpoints, each in a
fresh process (median of 3, inputs in the page cache).

For a 160M-parameter and the 1.1B bfloat16 Llama of bench/stream.py (built once in CACHE_DIR), the stream
backend writes the merged model (merge_and_unload()'s bits); then it times `safe-merge verify` with the output
check off (the weight checks alone, one tensor at a time, as deltalint checks weights only) and as a user runs it
(`--check-outputs auto`), and `deltalint check` when a Python with deltalint is given; wall seconds, peak RSS and
the ratio to deltalint. Also prints the verifier's exact / tolerance-only counts.

    python bench/verify.py CACHE_DIR [--deltalint PYTHON] [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stream import build, stream_cmd, timed  # noqa: E402


def verify_cmd(base: Path, adapter: Path, merged: Path, outputs: str) -> list[str]:
    script = Path(sys.executable).parent / "safe-merge"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "safe_merge"]
    return [*command, "verify", str(base), str(adapter), str(merged), "--check-outputs", outputs, "--json"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache", type=Path)
    parser.add_argument("--deltalint", help="a Python interpreter with deltalint installed")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    failed = False
    for name in ("llama-160m",) + (() if args.skip_large else ("tinyllama-1.1b",)):
        base, adapter = build(args.cache, name)
        merged = args.cache / "verify-runs" / name
        merged.parent.mkdir(exist_ok=True)
        subprocess.run(stream_cmd(base, adapter, merged, "never"), check=True, capture_output=True)
        report = json.loads(
            subprocess.run(verify_cmd(base, adapter, merged, "never"), capture_output=True, text=True).stdout
        )
        w = report["verification"]["weights"]
        print(f"{name}: exact {w['exact']}, within tolerance only {w['tolerance_only']}; {report['weights_read']}")
        inputs = (base, adapter, merged)
        rows = [
            ("safe-merge verify --check-outputs never", timed(verify_cmd(base, adapter, merged, "never"), inputs)),
            ("safe-merge verify (auto)", timed(verify_cmd(base, adapter, merged, "auto"), inputs)),
        ]
        if args.deltalint:
            peer = [args.deltalint, "-m", "deltalint.cli", "check", "--base", str(base), "--adapter", str(adapter)]
            rows.append(("deltalint check", timed([*peer, "--merged", str(merged), "--quiet"], inputs)))
        for label, (wall, rss, code) in rows:
            print(f"  {label:42s} {wall:7.2f} s  {rss:8.0f} MiB peak RSS  exit {code}")
            failed = failed or bool(code)
        if args.deltalint:
            ours, peer_wall = rows[0][1][0], rows[-1][1][0]
            print(f"  weights-only verify / deltalint: {ours / peer_wall:.2f}x the time")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
