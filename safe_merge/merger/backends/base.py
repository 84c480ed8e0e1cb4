"""The protocol every backend follows, so that the pipeline never asks which backend it holds.

A backend is offered a job (after the preflight) and the adapter to merge (migrated, or combined); it answers
with itself, or with the reasons it cannot take the job. Then the pipeline calls, in order: ``merge`` (in-memory
work, warnings recorded for the report), ``write`` into an empty staging directory, ``verify`` what it wrote
there. ``estimate_peak_memory`` and ``checks`` serve `merge --plan`, which writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.merger.job import Job
from safe_merge.verifier.verdict import Verification

WEIGHT_CHECKS = (
    "weights: every merged tensor replayed bit for bit (merge_and_unload(), safe_merge=True, float64 rounded once), "
    "else against the float64 merge within its tolerance, with a test for a systematic lean"
)


class Backend(Protocol):
    name: ClassVar[str]  # what --backend calls it, and the report's "backend"
    chosen_because: ClassVar[str]  # the report's reason when --backend auto picks it first

    notes: list[str]  # for the report's warnings: what the backend did beyond the plain merge

    @classmethod
    def offer(cls, job: Job, adapter: AdapterFiles) -> Backend | list[str]:
        """The backend, ready for this job, or why it cannot take it (one line per reason)."""
        ...

    def merge(self) -> None:
        """Whatever is done before anything is written (loading and merging in memory); may do nothing."""
        ...

    def builds_models(self) -> bool:
        """Whether this merge builds a model from the base's config.json (to merge, or to check outputs): the
        pipeline then has the installed transformers read that config before anything is written."""
        ...

    def write(self, stage: Path) -> list[str]:
        """Write the merged model into ``stage`` (an empty directory); the names of the files written."""
        ...

    def verify(self, stage: Path) -> Verification:
        """Check what ``write`` left in ``stage`` against the base and the adapter."""
        ...

    def report(self) -> dict:
        """What this backend adds to the merge report (its own figures), after ``verify``."""
        ...

    def estimate_peak_memory(self, free: int) -> dict:
        """For --plan: {"bytes": peak or None, ...} from headers and configs alone, given ``free`` bytes."""
        ...

    def checks(self) -> list[str]:
        """For --plan: the weight checks this backend runs, one line each."""
        ...
