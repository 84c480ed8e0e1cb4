"""The preflight: every refusal that can be made before any model is loaded, as one ordered list of rules.

Each rule names what it refuses; a refusal carries the rule's name ("refused by rule: NAME"). The rules read the
job's inputs as they need them, so the first refusal comes before any later input is read. One refusal needs the
built base model and runs when the adapters are combined: a saved copy of a tied parameter that differs from the
base (merger/weighted_adapter.py, rule `combinable`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from safe_merge.io.hub import check_push
from safe_merge.io.output_path import check_output, check_report
from safe_merge.merger.job import Job
from safe_merge.merger.request import MergeRequest
from safe_merge.merger.rules import base_config, combinable, known_bugs, quantization, rule, tokenizer


@dataclass(frozen=True)
class Rule:
    name: str
    refuses: str  # what it refuses, in a few words (CONTRIBUTING.md lists them)
    check: Callable[[Job], None]


def _output_path(job: Job) -> None:
    out = check_output(job.out, job.inputs, force=job.request.force)
    if job.request.report is not None:
        check_report(job.request.report, out, job.inputs, job.request.force)


def _combination(job: Job) -> None:
    if job.combination is not None:
        combinable.refuse_uncombinable(job.combination, job.adapter_files, job.peft_release, job.base_dir)


def _combination_bugs(job: Job) -> None:
    if job.combination is not None:
        known_bugs.refuse_combination_bugs(job.combination, job.adapter_files, job.peft_release)


def _release_bugs(job: Job) -> None:
    model_type = getattr(job.base_config, "model_type", None)
    for files in job.adapter_files:
        known_bugs.refuse_known_bugs(files, job.peft_release, job.dtype, model_type)


RULES: tuple[Rule, ...] = (
    Rule(
        "push-possible",  # first: one request, before any download
        "--push-to-hub with a malformed repo id, offline, or with no token the hub accepts",
        lambda job: check_push(job.request.push_to_hub) if job.request.push_to_hub is not None else None,
    ),
    Rule(
        "output-path",
        "an OUT or --report that is, holds or lies inside an input, or exists without --force",
        _output_path,
    ),
    Rule(
        "adapters",
        "non-LoRA adapters, NaN/Inf tensors, keys the installed PEFT lacks (lora-only, finite-adapter, migratable)",
        lambda job: job.sources,
    ),
    Rule(
        "base-readable",
        "a base whose config.json has sizes that are not whole numbers, or with damaged weight files; once the "
        "backend is chosen, one whose config.json this transformers cannot read when a model is built from it",
        lambda job: (base_config.readable(job.base_dir, job.base_config), job.base_numel),
    ),
    Rule("combinable", "adapters a weighted combination cannot join", _combination),
    Rule("known-combination-bugs", "combinations the installed PEFT computes wrongly", _combination_bugs),
    Rule(
        "quantization-policy",
        "quantized bases under --quantized refuse, without their library, or combined",
        lambda job: quantization.quantization_policy(job.quant, job.base_dir, job.policy, job.combination),
    ),
    Rule(
        "tokenizer-fits",
        "a tokenizer with more ids than the model has embedding rows",
        lambda job: [tokenizer.tokenizer_fits(job.base_config, job.base_dir, s.path) for s in job.sources],
    ),
    Rule("known-release-bugs", "merges the installed PEFT gets wrong or crashes on", _release_bugs),
)


def preflight(request: MergeRequest) -> Job:
    """Run every rule in order; the job they leave has every input read and checked."""
    job = Job(request)
    for each in RULES:
        with rule(each.name):
            each.check(job)
    return job
