"""The lean statistic and the diagnosis on synthetic tensors: a scale error hidden in every element's tolerance
is seen and estimated; rounding noise of a correct arithmetic is not called a lean; causes are named."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from safe_merge.verifier.delta import LayerKind, ModuleLora, merged_weight
from safe_merge.verifier.diagnosis import diagnose
from safe_merge.verifier.systematic import Z_LIMIT, drift

GEN = torch.Generator().manual_seed(0)
W = (torch.randn(512, 512, generator=GEN) * 0.02).to(torch.bfloat16)
LORA = ModuleLora(
    "m", LayerKind.LINEAR, torch.randn(8, 512, generator=GEN, dtype=torch.float64) * 0.02,
    torch.randn(512, 8, generator=GEN, dtype=torch.float64) * 0.02, 0.5,
)  # fmt: skip
START = W.to(torch.float64)
CHANGE = merged_weight(START, LORA) - START  # a few ulps of W: 1.001 moves each element by a hundredth of one


@pytest.mark.parametrize("scale", [1.001, 0.999, 1.02])
def test_a_scale_error_inside_every_tolerance_is_seen_and_estimated(scale):
    got = (START + scale * CHANGE).to(torch.bfloat16)
    lean = drift(got, W, CHANGE)
    assert lean.systematic and abs(lean.z) > Z_LIMIT
    assert lean.scale_error == pytest.approx(scale - 1, rel=0.25)
    assert lean.detectable < abs(scale - 1)


def test_a_correct_arithmetic_the_replays_do_not_know_is_not_a_lean():
    """The delta rounded to bfloat16 first, then added: a different rounding, no lean."""
    got = W + CHANGE.to(torch.bfloat16)
    lean = drift(got, W, CHANGE)
    assert lean.spread > 0 and not lean.systematic, lean


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda: START, "not applied"),
        (lambda: START + 2 * CHANGE, "applied twice"),
        (lambda: START - CHANGE, "sign flipped"),
        (lambda: START + CHANGE.T, "transposed"),
        (lambda: START + 1.1 * CHANGE, "scale mismatch"),
        (lambda: merged_weight(START, dataclasses.replace(LORA, a=LORA.a * _half_rank())), "partial rank: 4 of 8"),
    ],
)
def test_a_failed_tensor_names_its_likely_cause(make, phrase):
    got = make().to(torch.float32)  # float32: the change is resolved, as in a failure the tolerance saw
    assert phrase in diagnose(got, START, LORA, START + CHANGE)


def _half_rank() -> torch.Tensor:
    keep = torch.zeros(8, 1, dtype=torch.float64)
    keep[:4] = 1
    return keep
