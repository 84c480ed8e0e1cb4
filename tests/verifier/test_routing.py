"""MoE routing held fixed in the output check: a correct bfloat16 merge passes although rounding flips which
experts a token picks, and a wrong expert still fails the check."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file, save_file

from tests.helpers import run_cli, save_model
from tests.release import INSTALLED, converted_at_load, has_key

pytestmark = [
    pytest.mark.skipif(
        not has_key("target_parameters") or not hasattr(transformers, "GptOssForCausalLM"),
        reason="needs target_parameters (PEFT 0.17+) and gpt-oss (transformers 4.55+)",
    ),
    converted_at_load,
]


@pytest.fixture
def gpt_oss_bf16(tmp_path):
    """A tiny gpt-oss in bfloat16 (4 experts, top-2, stacks stored [E, in, out]) and a LoRA on its expert stacks."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        hidden_size=32,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=64,
        max_position_embeddings=64,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    base = transformers.GptOssForCausalLM(config).eval().to(torch.bfloat16)
    if not any(p.dim() == 3 for p in base.parameters()):
        pytest.skip("the installed transformers keeps gpt-oss experts as separate modules")
    save_model(base, tmp_path / "base")
    lora = peft.LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )
    model = peft.get_peft_model(copy.deepcopy(base).float(), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(3)
    save_model(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


# measured in the full tier: with PEFT 0.21.2 on transformers 4.57.6 the stream backend writes gpt-oss's expert
# stacks unchanged, the verifier fails the merge ("not applied", exit 1, nothing written) and --backend peft passes;
# PEFT 0.17.1 on 4.57.6 and every transformers 5 cell pass. Kept visible until the stream backend is fixed there.
STREAM_GPT_OSS_ON_4 = pytest.mark.xfail(
    transformers.__version__.startswith("4.") and Version(INSTALLED) >= Version("0.19.0"),
    reason="stream backend leaves gpt-oss expert stacks unmerged with PEFT 0.19+ on transformers 4.x (caught: exit 1)",
    strict=True,
)


@STREAM_GPT_OSS_ON_4
def test_a_correct_bfloat16_moe_merge_passes_with_the_routing_held_fixed(gpt_oss_bf16, tmp_path, capsys):
    base, adapter = gpt_oss_bf16
    code, report, err = run_cli(capsys, "merge", base, adapter, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    outputs = report["verification"]["outputs"]
    assert outputs["routing_held_fixed"] == 2
    assert outputs["max_abs"] <= outputs["tol"] < outputs["adapter_effect"]


@STREAM_GPT_OSS_ON_4
def test_a_wrong_expert_still_fails_the_output_check(gpt_oss_bf16, tmp_path, capsys):
    base, adapter = gpt_oss_bf16
    assert run_cli(capsys, "merge", base, adapter, "-o", tmp_path / "out")[0] == 0
    shard = tmp_path / "out" / "model.safetensors"
    tensors = load_file(str(shard))
    name = "model.layers.1.mlp.experts.down_proj"
    tensors[name] = (tensors[name].float() * 1.5).to(tensors[name].dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, report, err = run_cli(capsys, "verify", base, adapter, tmp_path / "out", "--json")
    assert code == 1, err
    assert report["verification"]["outputs"]["passed"] is False
    assert any(name in f for f in report["verification"]["weights"]["failures"])
