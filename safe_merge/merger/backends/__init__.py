"""The backends, as one registry: each merges a job, writes it into a staging directory and verifies what it wrote
(the protocol is base.py). Adding a backend is one module and one line in REGISTRY.

``choose`` offers the job to each backend in REGISTRY order (only those named NAME under --backend NAME) and
takes the first that accepts; the report says why.
"""

from __future__ import annotations

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.errors import BadInput
from safe_merge.merger.backends.base import Backend
from safe_merge.merger.backends.peft import PeftBackend
from safe_merge.merger.backends.quantized import QuantizedBackend
from safe_merge.merger.backends.stream.backend import StreamBackend
from safe_merge.merger.job import Job

REGISTRY: tuple[type[Backend], ...] = (StreamBackend, QuantizedBackend, PeftBackend)


def names() -> tuple[str, ...]:
    """What --backend accepts: auto, then each backend's name in REGISTRY order."""
    return ("auto", *dict.fromkeys(cls.name for cls in REGISTRY))


def choose(job: Job, adapter: AdapterFiles) -> tuple[Backend, str]:
    """The backend for this job and the reason it was chosen; refused (exit 2) when the one asked for cannot."""
    requested = job.request.backend
    declined: list[tuple[str, list[str]]] = []
    for cls in REGISTRY:
        if requested not in ("auto", cls.name):
            continue
        offered = cls.offer(job, adapter)
        if isinstance(offered, list):
            declined.append((cls.name, offered))
            continue
        if requested != "auto":
            return offered, f"asked for (--backend {requested})"
        if not declined:
            return offered, cls.chosen_because
        name, why = declined[0]
        return offered, f"the {name} backend cannot: {why[0]}"
    name, why = next((d for d in declined if d[0] == requested), declined[0])
    others = sorted({cls.name for cls in REGISTRY} - {name})
    hint = f"use --backend {' or '.join(others)} (or auto)"
    if job.quant is not None and job.quant.stored is not None:
        hint = "merge into the unquantized base, then quantize the merged model"
    raise BadInput(
        f"the {name} backend cannot merge this: {why[0]}" + (f" (and {len(why) - 1} more)" if len(why) > 1 else ""),
        hint=hint,
    )
