"""Bit-for-bit comparison and the finiteness test of the exact tier."""

from __future__ import annotations

import pytest
import torch

from safe_merge.verifier.bits import finite, same_bits
from safe_merge.verifier.weights import exact_result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_same_bits_holds_for_a_copy_and_fails_on_one_changed_element(dtype):
    a = torch.randn(37, 11, dtype=torch.float32).to(dtype)  # odd sizes: not a whole number of 8-byte words
    b = a.clone()
    assert same_bits(a, b)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    b.view(bits)[36, 10] ^= 1  # the last element, its lowest bit
    assert not same_bits(a, b)


def test_same_bits_compares_bytes_not_values():
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))  # equal values, different bits
    nan = torch.tensor([float("nan")])
    assert same_bits(nan, nan.clone()) and not torch.equal(nan, nan.clone())  # one NaN as stored, twice
    assert not same_bits(torch.zeros(2, 3), torch.zeros(3, 2))
    assert not same_bits(torch.zeros(4), torch.zeros(4, dtype=torch.float64))
    assert not same_bits(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.float16))


def test_same_bits_reads_transposed_and_sliced_tensors_as_their_values_are_laid_out():
    a = torch.randn(8, 5)
    assert same_bits(a.T, a.T.contiguous()) and not same_bits(a.T, a.contiguous().view(5, 8))
    assert same_bits(a[2:5, 1:3], a.clone()[2:5, 1:3])


def test_finite_finds_nan_and_inf_anywhere():
    t = torch.randn(100, dtype=torch.bfloat16)
    assert finite(t) and finite(torch.arange(3)) and finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = t.clone()
        broken[57] = bad
        assert not finite(broken)


def test_a_tensor_whose_bits_match_a_merge_that_overflowed_still_fails():
    start = torch.zeros(4, dtype=torch.bfloat16)
    got = torch.tensor([1.0, float("inf"), 0.0, 0.0], dtype=torch.bfloat16)
    result = exact_result("w", "merge_and_unload()", got, start, lambda: got.double() - start.double())
    assert not result.passed and result.problem == "holds NaN or Inf" and not result.exact
    fine = exact_result("w", "merge_and_unload()", got.nan_to_num(posinf=2.0), start, lambda: None)
    assert fine.passed and fine.exact == "merge_and_unload()"
