"""MoE expert stacks with LoRA on them (target_parameters, PEFT 0.17+; fused experts, transformers 5): merged,
and every expert checked against the exact merge by the weight check alone."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import run_cli, save_model
from tests.moe import MODELS, fused, tiny_moe
from tests.release import converted_at_load, has_key

pytestmark = [
    pytest.mark.skipif(not has_key("target_parameters"), reason="the installed PEFT has no target_parameters (0.17+)"),
    converted_at_load,
]


@pytest.fixture(params=sorted(MODELS))
def moe(request, tmp_path):
    """A tiny MoE base saved by save_pretrained, and an adapter on q_proj and both expert stacks."""
    if not fused(request.param):
        pytest.skip("the installed transformers keeps experts as separate Linear modules")
    base = tiny_moe(request.param)
    save_model(base, tmp_path / "base")
    lora = peft.LoraConfig(
        r=2,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )
    model = peft.get_peft_model(copy.deepcopy(base), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(5)
    save_model(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


@pytest.mark.parametrize("backend", ["peft", "stream"])
@pytest.mark.parametrize("check_outputs", ["always", "never"])
def test_lora_on_expert_stacks_merges_and_every_expert_is_checked(moe, tmp_path, capsys, check_outputs, backend):
    base, adapter = moe
    out = tmp_path / "out"
    code, report, err = run_cli(
        capsys, "merge", base, adapter, "-o", out, "--backend", backend, "--check-outputs", check_outputs, "--json"
    )
    assert code == 0, err
    assert report["ledger"]["merged"] == 12 and report["ledger"]["unmatched"] == 0, report["ledger"]
    weights = report["verification"]["weights"]
    assert weights["checked_tensors"] >= 2 * 3 and weights["worst_ratio"] <= 1.0
    if check_outputs == "always":
        outputs = report["verification"]["outputs"]
        assert outputs["max_abs"] <= outputs["tol"] < outputs["adapter_effect"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_stream_backend_writes_the_experts_bit_for_bit_as_peft_merges_them(moe, tmp_path, capsys, dtype):
    """The stream merges a stack stored per expert piece by piece, never reading it whole; the bytes are PEFT's."""
    base, adapter = moe
    for backend in ("peft", "stream"):
        code, _, err = run_cli(
            capsys, "merge", base, adapter, "-o", tmp_path / backend, "--backend", backend, "--dtype", dtype
        )
        assert code == 0, err
    peft_out, stream_out = (load_file(str(tmp_path / b / "model.safetensors")) for b in ("peft", "stream"))
    assert sorted(peft_out) == sorted(stream_out)
    differ = [k for k in peft_out if not torch.equal(peft_out[k], stream_out[k])]
    assert not differ, differ


def test_one_expert_off_in_the_merged_checkpoint_is_named_by_the_weight_check(moe, tmp_path, capsys):
    base, adapter = moe
    code, _, err = run_cli(capsys, "merge", base, adapter, "-o", tmp_path / "out")
    assert code == 0, err
    shard = tmp_path / "out" / "model.safetensors"
    tensors = load_file(str(shard))
    experts = sorted(k for k in tensors if "layers.1." in k and ".experts." in k)  # per expert, as saved
    tensors[experts[-1]] = tensors[experts[-1]] * 1.01  # one expert's projection, a 1% error
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, report, err = run_cli(capsys, "verify", base, adapter, tmp_path / "out", "--json")
    assert code == 1, err
    assert any("layers.1." in f and "experts" in f for f in report["verification"]["weights"]["failures"]), report[
        "verification"
    ]["weights"]


@pytest.mark.parametrize("backend", ["peft", "stream"])
def test_a_lora_on_the_router_weight_merges_as_a_linear_weight(tmp_path, capsys, backend):
    """transformers 5's routers are no Linear; target_parameters (or all-linear, which PEFT 0.21 rewrites so)
    reaches their 2-D weight, which PEFT merges as a Linear weight."""
    if not fused("qwen3_moe"):
        pytest.skip("the installed transformers keeps experts as separate Linear modules")
    base = tiny_moe("qwen3_moe")
    save_model(base, tmp_path / "base")
    targets = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[], target_parameters=targets, init_lora_weights=False)
    )
    save_model(model, tmp_path / "adapter")
    out = tmp_path / "out"
    code, report, err = run_cli(
        capsys, "merge", tmp_path / "base", tmp_path / "adapter", "-o", out, "--backend", backend, "--json"
    )
    assert code == 0, err
    assert report["ledger"]["merged"] == 12 and report["ledger"]["unmatched"] == 0, report["ledger"]
