"""The breadth table (table.toml): every row built tiny from its transformers config class, merged with both
backends through the command line, verified, and its merged model compared independently with the unmerged
PeftModel (fp32, ≤ 1e-5). `python -m tests.breadth.run` runs every row and prints the table with counts; the suite
runs the rows marked ci."""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import tomllib
import torch
from packaging.version import Version

TABLE = Path(__file__).with_name("table.toml")
BACKENDS = ("peft", "stream")
AGREEMENT = 1e-5  # merged vs unmerged PeftModel outputs, fp32


def rows() -> list[dict]:
    return tomllib.loads(TABLE.read_text(encoding="utf-8"))["row"]


@dataclass
class Outcome:
    row: str
    backend: str
    status: str  # merged | refused | skipped (this installation cannot build it) | unbuilt | defect
    detail: str = ""
    diff: float | None = None


def skip_reason(row: dict) -> str | None:
    """Why this installation cannot build the row (an older transformers or PEFT), else None."""
    import peft
    import transformers

    if Version(transformers.__version__) < Version(row.get("since", "0")):
        return f"transformers < {row['since']}"
    if not hasattr(transformers, row["config"]) or not hasattr(transformers, row["model"]):
        return f"transformers {transformers.__version__} has no {row['model']}"
    from tests.release import CONVERTED_AT_LOAD_BUG

    if row.get("converted_at_load") and CONVERTED_AT_LOAD_BUG:
        return CONVERTED_AT_LOAD_BUG
    fields = set(peft.LoraConfig.__dataclass_fields__)
    missing = sorted(set(row["lora"]) - fields)
    return f"peft {peft.__version__} has no {', '.join(missing)}" if missing else None


def build(row: dict, root: Path) -> tuple[Path, Path]:
    """The row's base (saved by save_pretrained) and an adapter made by get_peft_model, every trainable tensor
    moved off its init as training would."""
    import peft
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, row["config"])(**row.get("config_kwargs", {}))
    base = getattr(transformers, row["model"])(config).eval()
    base.save_pretrained(str(root / "base"))
    lora = {"init_lora_weights": False, **row["lora"]}
    if "adapter_model" in row:  # trained in a task class loaded from the base (its head newly made)
        base = _task_class(row).from_pretrained(str(root / "base"), **row.get("adapter_model_kwargs", {}))
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen).to(param.dtype))
    model.save_pretrained(str(root / "adapter"))
    return root / "base", root / "adapter"


def agreement(row: dict, base: Path, adapter: Path, merged: Path) -> tuple[float, float]:
    """max |merged − unmerged PeftModel| on the probe inputs, both loaded afresh in float32, and how far the
    adapter moves those outputs (a merge that did nothing is off by that much)."""
    import peft

    from safe_merge.verifier.probes import main_output, probe_inputs

    cls = _task_class(row)
    kwargs = row.get("adapter_model_kwargs", {})
    reference = peft.PeftModel.from_pretrained(cls.from_pretrained(str(base), **kwargs).eval(), str(adapter)).eval()
    plain = cls.from_pretrained(str(merged)).eval()
    inputs = probe_inputs(plain.config)
    with torch.no_grad():
        want = main_output(reference.base_model(**inputs)).double()
        got = main_output(plain(**inputs)).double()
        with reference.disable_adapter():
            without = main_output(reference.base_model(**inputs)).double()
    return float((want - got).abs().max()), float((want - without).abs().max())


def _task_class(row: dict):
    """The class the adapter was trained in: the row's adapter_model, else the base's own."""
    import transformers

    return getattr(transformers, row.get("adapter_model", row["model"]))


def run_row(row: dict) -> list[Outcome]:
    from safe_merge.cli import main

    reason = skip_reason(row)
    if reason:
        return [Outcome(row["name"], b, "skipped", reason) for b in BACKENDS]
    out = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            base, adapter = build(row, Path(tmp))
        except Exception as exc:  # the table's row, not safe-merge: said as such
            return [Outcome(row["name"], b, "unbuilt", f"{type(exc).__name__}: {exc}"[:200]) for b in BACKENDS]
        for backend in BACKENDS:
            target = Path(tmp) / f"out-{backend}"
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(["merge", str(base), str(adapter), "-o", str(target), "--backend", backend])
            text = err.getvalue()
            last = next((line for line in text.splitlines() if "error" in line), text.strip()[-200:])
            if "Traceback" in text or code not in (0, 2):
                out.append(Outcome(row["name"], backend, "defect", f"exit {code}: {last}"))
            elif code == 2:
                expected = row.get("expect") == "refused" or "stream backend cannot" in text
                out.append(Outcome(row["name"], backend, "refused" if expected else "defect", last))
            elif row.get("expect") == "refused":
                out.append(Outcome(row["name"], backend, "defect", "merged although it must be refused"))
            else:
                diff, effect = agreement(row, base, adapter, target)
                # an adapter that barely moves the outputs would let a merge that did nothing pass
                status = "merged" if diff <= AGREEMENT < effect / 100 else "defect"
                detail = f"vs PeftModel {diff:.2g} (the adapter moves outputs by {effect:.2g})"
                out.append(Outcome(row["name"], backend, status, detail, diff))
    return out


def main(names: list[str] | None = None) -> int:
    """Run the table (or the named rows) and print it; exit 1 when any row is a defect."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    outcomes = [o for row in rows() if not names or row["name"] in names for o in run_row(row)]
    width = max(len(o.row) for o in outcomes)
    print(f"{'row':<{width}}  {'backend':<7}  {'outcome':<8}  detail")
    for o in outcomes:
        print(f"{o.row:<{width}}  {o.backend:<7}  {o.status:<8}  {o.detail[:110]}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("merged", "refused", "skipped", "unbuilt", "defect")}
    print("  ".join(f"{k}: {v}" for k, v in counts.items()), f"(rows: {len(outcomes) // len(BACKENDS)})")
    return 1 if counts["defect"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
