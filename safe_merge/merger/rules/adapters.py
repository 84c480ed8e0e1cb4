"""One adapter on its own: finite tensors, and keys the installed PEFT understands (after the migrations compat/
plans). That it is a LoRA adapter at all is the verifier's require_lora, run first (merger/job.read_source)."""

from __future__ import annotations

from safe_merge.compat.adapter_files import AdapterFiles, nonfinite_tensors
from safe_merge.compat.plan import Plan
from safe_merge.errors import BadInput, SafeMergeError

# adapter_config.json values the merge's arithmetic reads, and what each must be
NUMBERS = {"r": (int,), "lora_alpha": (int, float)}
MAPPINGS = ("rank_pattern", "alpha_pattern")


def well_formed(files: AdapterFiles) -> None:
    """The config values the merge computes with have the types PEFT writes: a rank and an alpha that are numbers,
    patterns that map module names to numbers."""
    path = files.path / "adapter_config.json"
    hint = "fix the value in adapter_config.json, or save the adapter again with PEFT"
    for key, types in NUMBERS.items():
        value = files.config.get(key)
        if key not in files.config and key == "lora_alpha":
            continue  # PEFT's default applies
        if isinstance(value, bool) or not isinstance(value, types) or value <= 0:
            raise BadInput(f"{value!r} is not a positive number", path=path, key=key, hint=hint)
    for key in MAPPINGS:
        value = files.config.get(key) or {}
        bad = not isinstance(value, dict) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value.values()
        )
        if bad:
            raise BadInput(f"{value!r} does not map module names to numbers", path=path, key=key, hint=hint)


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
