"""The weight check stands apart from the code the merge shares with it: mistakes planted in the shared ledger or
in the stream backend's untying fail the merge with the output check off, naming the tensor; and the tolerances
that are not otherwise exercised fast are pinned to their values."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import safe_merge
from safe_merge.merger.backends.stream import write as stream_write
from safe_merge.verifier import verdict
from safe_merge.verifier.ledger import Status
from safe_merge.verifier.tolerance import output_tolerance
from tests.helpers import materialize
from tests.release import requires_release
from tests.strategies import FEATURES, TINY, Case

pytestmark = requires_release("stream_backend_matches")
Q = "model.layers.0.self_attn.q_proj"


def _skipping(real):
    """build_ledger with one LoRA module put down as skipped, as a ledger bug would: its rows SKIPPED, its module
    gone, so neither the merge nor the expectations built from the ledger know about it."""

    def planted(*args, **kwargs):
        ledger = real(*args, **kwargs)
        target = next((m for m in sorted(ledger.modules) if m.endswith(".q_proj")), None)
        if target is not None:
            del ledger.modules[target]
            ledger.entries = [
                dataclasses.replace(e, status=Status.SKIPPED, reason="planted")
                if e.key.startswith(f"base_model.model.{target}.")
                else e
                for e in ledger.entries
            ]
        return ledger

    return planted


def test_a_lora_module_the_shared_ledger_skips_fails_the_merge_with_outputs_off(tmp_path, monkeypatch):
    case = Case(
        "llama",
        TINY["two_layers"],
        False,
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "float32",
        1,
    )
    base, adapter = materialize(case, tmp_path)
    monkeypatch.setattr(stream_write, "build_ledger", _skipping(stream_write.build_ledger))
    monkeypatch.setattr(verdict, "build_ledger", _skipping(verdict.build_ledger))
    report = safe_merge.merge(base, adapter, tmp_path / "out", backend="stream", check_outputs="never")
    assert report["exit_code"] == 1, report["problems"]
    assert any("q_proj" in p and "ledger" in p for p in report["problems"]), report["problems"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not FEATURES["embedding_merge"], reason="this release cannot merge LoRA on embeddings")
def test_a_stream_merge_that_keeps_a_tie_the_adapter_breaks_fails_with_outputs_off(tmp_path, monkeypatch):
    """GPT-2 ties its LM head to wte; a LoRA on wte must leave the head as it was. A stream backend that forgot
    to write the head apart (the tie kept) makes the head move with the embedding."""
    case = Case(
        "gpt2",
        TINY["two_layers"],
        True,
        {"r": 4, "lora_alpha": 8, "target_modules": ["wte", "c_attn"], "fan_in_fan_out": True},
        "float32",
        2,
    )
    base, adapter = materialize(case, tmp_path)
    monkeypatch.setattr(stream_write.StreamMerge, "untie", property(lambda self: False))
    report = safe_merge.merge(base, adapter, tmp_path / "out", backend="stream", check_outputs="never")
    assert report["exit_code"] == 1, report["problems"]
    assert any(p.startswith("lm_head.weight: the merged config ties it") for p in report["problems"])


def test_the_output_tolerance_is_four_ulps_times_root_depth_or_three_times_the_noise():
    reference = torch.tensor([[2.0, -8.0]])
    eps = float(torch.finfo(torch.bfloat16).eps)
    assert output_tolerance(reference, torch.bfloat16, depth=4) == pytest.approx(4 * 2 * eps * 8)
    assert output_tolerance(reference, torch.bfloat16, depth=4, noise=1.0) == pytest.approx(3.0)
    assert output_tolerance(reference, torch.float32, depth=1, noise=1e-12) == pytest.approx(
        4 * float(torch.finfo(torch.float32).eps) * 8
    )
