"""The exact tier: the bits each known correct merge arithmetic writes, and which one a merged tensor matches.

A merge is correct in more than one way: PEFT's ``merge_and_unload()`` adds a float32 delta and rounds once,
``merge_and_unload(safe_merge=True)`` rounds the delta first (from 0.16), a float64 merge rounds once at the end.
Each writes other bits in half precision, all within a few ulps of the exact value. A tolerance cannot tell a
merge at 1.001× the adapter's strength from these; replaying each arithmetic bit for bit can. A tensor that
matches one exactly is named with it ("exact: merge_and_unload()"); the rest fall back to the tolerance and the
systematic-error statistics (weights.py, systematic.py).

The replays are this module's own, from the adapter's tensors and the facts compat/rounding.py reads from
history.json (which precision PEFT holds the factors in and multiplies them in, where it rounds the delta); none
of the merge backends' code is used, so a mistake in a backend cannot match its own replay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from safe_merge.compat import rounding
from safe_merge.io.buffers import Buffers
from safe_merge.io.loading import installed_peft
from safe_merge.verifier.bits import same_bits
from safe_merge.verifier.delta import LayerKind, ModuleLora, merged_bias, merged_weight

SAVED = "the saved tensor"
FLOAT64 = "float64, rounded once"
_REPLAYED = (LayerKind.LINEAR, LayerKind.LINEAR_FIFO, LayerKind.EMBEDDING)


def exact_match(
    got: torch.Tensor,
    start: torch.Tensor,
    lora: ModuleLora | None = None,
    leaf: str = "weight",
    copy: torch.Tensor | None = None,
    stored: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    buffers: Buffers | None = None,
) -> str | None:
    """The name of the arithmetic whose bits ``got`` holds, or None. ``start``: the tensor's value before the
    merge in ``got``'s dtype, as every merge starts from it; ``lora``: the LoRA that merges here (its tensors as
    stored or widened); ``copy``: the value a saved copy or trainable-token rows put there; ``stored``: the base
    tensor as stored, or a function that reads it, when its dtype is not the merged one (a float64 merge may start
    from it; read only when the cheaper replays did not match)."""
    if copy is not None:
        return SAVED if same_bits(copy.to(got.dtype), got) else None
    if lora is None or tuple(got.shape) != tuple(start.shape):
        return None
    for label, replay in arithmetics(start, lora, leaf, stored, buffers):
        if replay.matches(got):
            return label
    return None


def arithmetics(
    start: torch.Tensor,
    lora: ModuleLora,
    leaf: str = "weight",
    stored: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    buffers: Buffers | None = None,
) -> Iterator[tuple[str, _Whole | _Blocks]]:
    """(name, replay) for every correct arithmetic known for this tensor, cheapest first; each replay is
    computed only when it is compared."""
    origins = [(FLOAT64, lambda: start)]
    if stored is not None:
        origins.append((f"{FLOAT64} from the base as stored", stored if callable(stored) else lambda: stored))
    exact = merged_bias if leaf == "bias" else merged_weight
    float64 = [
        (label, _Whole(lambda o=origin: exact(o().to(torch.float64), lora.widened()).to(start.dtype)))
        for label, origin in origins
    ]
    if leaf == "bias":
        if lora.bias is not None:
            yield "PEFT's merge", _Whole(lambda: _peft_bias(start, lora))
            yield from float64
        return
    if lora.kind not in _REPLAYED or (lora.magnitude is not None and lora.kind is LayerKind.EMBEDDING):
        return  # convolutions, expert stacks, DoRA on embeddings: the tolerance tier alone
    release = installed_peft()
    delta: list[torch.Tensor] = []

    def peft_delta() -> torch.Tensor:
        if not delta:
            delta.append(_peft_delta(lora, release, buffers))
        return delta[0]

    if lora.magnitude is not None:
        yield "merge_and_unload() (DoRA)", _Whole(lambda: _peft_dora(start, peft_delta(), lora))
    else:
        seen: set[bool] = set()
        for path, label in rounding.ROUNDINGS.items():
            first = rounding.rounds_delta_first(release, (lora.rounds_like or lora.kind).value, path)
            if first not in seen:  # the paths that round alike for this release and kind are one arithmetic
                seen.add(first)
                yield label, _Blocks(start, peft_delta, first)
    yield from float64


class _Whole:
    """A replay computed whole, then compared."""

    def __init__(self, make: Callable[[], torch.Tensor]):
        self.make = make

    def matches(self, got: torch.Tensor) -> bool:
        return same_bits(self.make(), got)


class _Blocks:
    """A PEFT add replayed a block of rows at a time against the tensor it is compared with, stopping at the first
    block that differs (a cache-sized block, as the merge itself works; most candidates that fail, fail early)."""

    rows_bytes = 2**21

    def __init__(self, start: torch.Tensor, delta: Callable[[], torch.Tensor], first: bool):
        self.start, self.delta, self.first = start, delta, first

    def matches(self, got: torch.Tensor) -> bool:
        delta = self.delta()
        if delta.dim() != 2:
            return same_bits(_peft_add(self.start, delta, self.first), got)
        rows = max(1, self.rows_bytes // max(1, delta.shape[1] * delta.element_size()))
        for i in range(0, delta.shape[0], rows):
            j = min(i + rows, delta.shape[0])
            if not same_bits(_peft_add(self.start[i:j], delta[i:j], self.first), got[i:j]):
                return False
        return True


def _peft_delta(lora: ModuleLora, release: str, buffers: Buffers | None = None) -> torch.Tensor:
    """get_delta_weight: the factors in the precision PEFT holds them, multiplied in float32 where the release
    widens half precision, laid out like the weight, scaled, in the factors' precision."""
    held = lora.compute_dtype
    a, b = lora.a.to(held), lora.b.to(held)
    if rounding.widened(release, held):
        a, b = a.to(torch.float32), b.to(torch.float32)
    if buffers is not None and a.dim() == b.dim() == 2:  # b @ a, into memory already faulted in
        product = torch.mm(b, a, out=buffers.take("replayed product", (b.shape[0], a.shape[1]), a.dtype))
    else:
        product = b @ a
    if lora.kind in (LayerKind.LINEAR_FIFO, LayerKind.EMBEDDING):
        product = product.T
    return product.mul_(lora.scale).to(held)


def _peft_add(start: torch.Tensor, delta: torch.Tensor, first: bool) -> torch.Tensor:
    if first:
        return start + delta.to(start.dtype)
    merged = start.clone()
    merged += delta  # in the wider dtype, rounded once into the weight's
    return merged


def _peft_dora(start: torch.Tensor, delta: torch.Tensor, lora: ModuleLora) -> torch.Tensor:
    """DoRA's merge: W + ΔW rescaled per output feature by m / ‖W + ΔW‖, the norm taken over the weight laid out
    [out, in] and computed in the delta's precision, the product rounded once into the weight's dtype."""
    assert lora.magnitude is not None
    fifo = lora.kind is LayerKind.LINEAR_FIFO
    combined = (start.T if fifo else start) + (delta.T if fifo else delta)
    norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
    factor = (lora.magnitude.to(lora.compute_dtype) / norm).view(-1, 1)
    return ((factor.T if fifo else factor) * (start + delta)).to(start.dtype)


def _peft_bias(start: torch.Tensor, lora: ModuleLora) -> torch.Tensor:
    assert lora.bias is not None
    return (start + lora.bias.to(lora.compute_dtype) * lora.scale).to(start.dtype)
