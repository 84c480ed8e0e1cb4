"""Which backend merges: the stream backend whenever it handles every part of the merge, PEFT otherwise; the
report gives the reason either way."""

from __future__ import annotations

import torch
from packaging.version import Version

from safe_merge.compat.history import History
from safe_merge.errors import BadInput
from safe_merge.io.loading import installed_peft
from safe_merge.merger.backends.stream.layout import might_tie, vocab_rows
from safe_merge.merger.backends.stream.write import Prepared
from safe_merge.verifier.delta import LayerKind
from safe_merge.verifier.ledger import Status

BACKENDS = ("auto", "peft", "stream")


def stream_blockers(prep: Prepared | None, config, *, combining: bool, quantized: bool) -> list[str]:
    """Why the stream backend cannot take this merge (empty: it can)."""
    if combining:
        return ["several adapters are combined with PEFT's add_weighted_adapter"]
    if quantized:
        return ["the base is quantized; its layers are dequantized and requantized by PEFT"]
    release = installed_peft()
    first = History.load().boundary("stream_backend_matches")
    if Version(release) < first:
        return [f"the installed PEFT {release} merges differently from the stream backend (it matches from {first})"]
    if getattr(config, "auto_map", None):
        return ["the model's code is not part of transformers (auto_map): its layer classes are unknown unbuilt"]
    if prep is None:
        return []
    out = [f"{m}: {why}" for m, why in prep.layout.problems.items()]
    if prep.layout.tied is None and might_tie(prep.config):
        tieable = sorted(set(vocab_rows(prep.checkpoint, prep.config)) & prep.touched)
        if tieable:
            out.append(
                f"{tieable[0]}: the config leaves weight tying on and the adapter changes this tensor, but which "
                "output weight shares it is only known to the built model"
            )
    for entry in prep.ledger.entries:
        if entry.status in (Status.UNMATCHED, Status.UNVERIFIED):
            out.append(f"{entry.key}: {entry.reason}")
    float32_bias = Version(release) < History.load().boundary("delta_rounded_before_add")
    for module, lora in prep.ledger.modules.items():
        if lora.magnitude is not None and lora.kind is LayerKind.EMBEDDING:
            out.append(f"{module}: DoRA on an embedding is merged by the PEFT backend")
        if lora.bias is not None and float32_bias and prep.dtype in (torch.float16, torch.bfloat16):
            out.append(f"{module}: PEFT {release} leaves a merged lora_B bias in float32; the PEFT backend keeps that")
    return out


def choose(requested: str, blockers: list[str]) -> tuple[str, str]:
    """(backend, reason)."""
    if requested not in BACKENDS:
        raise BadInput(f"--backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "peft":
        return "peft", "asked for (--backend peft)"
    if not blockers:
        why = "asked for (--backend stream)" if requested == "stream" else "the stream backend handles every part of it"
        return "stream", why
    if requested == "stream":
        raise BadInput(
            f"the stream backend cannot merge this: {blockers[0]}"
            + (f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""),
            hint="use --backend peft (or auto)",
        )
    return "peft", f"the stream backend cannot: {blockers[0]}"
