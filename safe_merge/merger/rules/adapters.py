"""One adapter on its own: finite tensors, and keys the installed PEFT understands (after the migrations compat/
plans). That it is a LoRA adapter at all is the verifier's require_lora, run first (merger/job.read_source)."""

from __future__ import annotations

from safe_merge.compat.adapter_files import AdapterFiles, nonfinite_tensors
from safe_merge.compat.plan import Plan
from safe_merge.errors import BadInput, SafeMergeError


def finite(files: AdapterFiles) -> None:
    broken = nonfinite_tensors(files)
    if broken:
        raise BadInput(
            f"{len(broken)} adapter tensors hold NaN or Inf (first: {broken[0]})",
            path=files.weight_file,
            hint="the training run diverged or the file is corrupt; use an earlier checkpoint",
        )


def migratable(plan: Plan, refusal: type[SafeMergeError] = BadInput) -> None:
    """A key the installed release lacks, and that changes the math, cannot be migrated away."""
    if plan.refused:
        raise refusal(plan.refusal_message(), hint="merge with a PEFT release that understands these keys")
