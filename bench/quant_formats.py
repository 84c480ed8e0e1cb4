"""The stored quantization formats × policies table (docs/quantized.md): a tiny Llama (hidden 64, 2 layers,
bfloat16) quantized by each format's own library where it can on a CPU (GPTQ and AWQ: the checkpoints gptqmodel
wrote, tests/fixtures/gptq; gpt-oss: MXFP4 experts), a LoRA on q/v/down (gpt-oss: q/v), merged by
`safe-merge merge` under dequantize and requantize. Prints the weight error against dequant(W) + ΔW (largest,
and as a share of the budget), the output difference from the unmerged model on the dequantized base with its
budget and the adapter's effect, and the output's size against the base's. Figures, not a test."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.merger.test_stream_quantized import FORMATS  # noqa: E402
from tests.quant.stored import checkpoints  # noqa: E402


def size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("model*.safetensors"))  # the weights, not a reference


def main() -> None:
    rows = ["| format | policy | weights: max error (worst / budget) | outputs: max diff / budget | adapter effect "
            "| size vs base | exit |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        float_dir = checkpoints.float_model(root)
        adapter = checkpoints.adapter_for(float_dir, root)
        cases = [(name, make(float_dir, root / f"base-{i}"), adapter) for i, (name, make) in enumerate(FORMATS.items())]
        for name in ("tiny-gptq-asym", "tiny-gptq-sym-descact", "tiny-awq-asym"):
            cases.append((f"{name} (gptqmodel)", *checkpoints.library_written(name, root / name)))
        cases.append(("gpt-oss MXFP4 experts (LoRA on attention)", *checkpoints.gpt_oss_mxfp4(root / "gpt-oss")))
        for i, (name, base, adapter) in enumerate(cases):
            for policy in ("dequantize", "requantize"):
                out = root / f"out-{i}-{policy}"
                cmd = [sys.executable, "-m", "safe_merge", "merge", base, adapter, "-o", out, "--quantized", policy]
                done = subprocess.run([str(c) for c in [*cmd, "--json"]], capture_output=True, text=True)
                report = json.loads(done.stdout)
                weights, outputs = report["verification"]["weights"], report["verification"]["outputs"]
                exact = sum(weights["exact"].values())
                error = (
                    f"0, bit-identical ({exact} tensors)"
                    if exact == weights["checked_tensors"]
                    else (f"{weights['max_abs']:.2g} ({weights['worst_ratio']:.2f})")
                )
                shown = f"{outputs['max_abs']:.2g} / {outputs['tol']:.2g}" if outputs.get("ran") else "not run"
                ratio = f"{size(out) / size(base):.2f}x" if out.exists() else "-"
                effect = f"{outputs.get('adapter_effect', 0):.2g}"
                rows.append(f"| {name} | {policy} | {error} | {shown} | {effect} | {ratio} | {done.returncode} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
