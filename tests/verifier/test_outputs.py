"""The output check's memory: the float64 copy that measures rounding, and what counts as available."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from safe_merge.verifier import outputs
from safe_merge.verifier.outputs import available_memory, float64_copy, rounding_noise


def _tied_model() -> nn.Module:
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)).to(torch.bfloat16)
    model[1].weight = model[0].weight  # tied, as an output embedding
    model.register_buffer("scale", torch.full((8,), 0.5, dtype=torch.bfloat16))
    return model


def test_the_float64_copy_converts_parameters_and_buffers_and_keeps_ties():
    model = _tied_model()
    copy64 = float64_copy(model)
    assert copy64[0].weight.dtype == copy64.scale.dtype == torch.float64
    assert copy64[1].weight is copy64[0].weight and copy64[0].weight is not model[0].weight
    assert torch.equal(copy64[0].weight.to(torch.bfloat16), model[0].weight)
    assert model[0].weight.dtype == model.scale.dtype == torch.bfloat16  # the model itself is left as it was


def test_the_float64_copy_runs_as_the_model_does():
    model = _tied_model()
    ids = torch.tensor([[1, 5, 9]])
    assert torch.allclose(float64_copy(model)(ids).float(), model(ids).float(), atol=0.05)


def test_a_plan_that_said_no_float64_copy_is_kept_whatever_memory_is_free_later(monkeypatch):
    model = _tied_model()
    ids = torch.tensor([[1, 5, 9]])
    out = model(ids).double()
    monkeypatch.setattr(outputs, "available_memory", lambda: 2**50)
    assert rounding_noise(model, ids, out, twin=False) is None  # the plan decided: no copy
    assert rounding_noise(model, ids, out) is not None  # undecided: it fits, so it is made


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MemAvailable is Linux's")
def test_available_memory_counts_the_page_cache_the_kernel_can_drop():
    with open("/proc/meminfo") as fh:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    assert abs(available_memory() - fields["MemAvailable"]) < 2**28  # read a moment apart
    assert available_memory() >= fields["MemFree"] - 2**28
