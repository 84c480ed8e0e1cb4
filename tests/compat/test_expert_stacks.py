"""An adapter on MoE experts one by one (the transformers 4.x / vLLM layout) merged into a model transformers 5
builds with fused expert stacks: rewritten as target_parameters on the stacks, exactly, by both backends."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file, save_file

from safe_merge.compat.expert_stacks import fused_in
from safe_merge.compat.migrations import expert_stacks
from safe_merge.verifier.probes import main_output, probe_inputs
from tests.helpers import run_cli, save_model
from tests.moe import EXPERTS, MODELS, TINY, tiny_moe
from tests.release import HISTORY, INSTALLED, converted_at_load, has_key

pytestmark = [
    pytest.mark.skipif(
        not has_key("target_parameters") or not fused_in(Version(transformers.__version__)),
        reason="needs target_parameters (PEFT 0.17+) and fused expert stacks (transformers 5)",
    ),
    converted_at_load,
]
HIDDEN, INTERMEDIATE, RANK = TINY["hidden_size"], MODELS["qwen3_moe"][2]["moe_intermediate_size"], 2


def _per_expert(tmp_path, alpha_pattern: dict):
    """A tiny Qwen3-MoE and an adapter keyed per expert (gate_proj, up_proj, down_proj of each) plus q_proj."""
    save_model(tiny_moe("qwen3_moe"), tmp_path / "base")
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    shapes = {
        "gate_proj": (INTERMEDIATE, HIDDEN),
        "up_proj": (INTERMEDIATE, HIDDEN),
        "down_proj": (HIDDEN, INTERMEDIATE),
    }
    for layer in range(2):
        modules = {f"model.layers.{layer}.self_attn.q_proj": (32, HIDDEN)}
        for e in range(EXPERTS):
            modules.update({f"model.layers.{layer}.mlp.experts.{e}.{n}": s for n, s in shapes.items()})
        for module, (rows, cols) in modules.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.3 * torch.randn(RANK, cols, generator=gen)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.3 * torch.randn(rows, RANK, generator=gen)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 3,
        "alpha_pattern": alpha_pattern,
        "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"],
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path / "base", adapter


@pytest.fixture
def per_expert(tmp_path):
    return _per_expert(tmp_path, {})


def test_per_expert_lora_merges_as_peft_itself_reads_it_with_both_backends(per_expert, tmp_path, capsys):
    base, adapter = per_expert
    for backend in ("peft", "stream"):
        code, report, err = run_cli(
            capsys, "merge", base, adapter, "-o", tmp_path / backend, "--backend", backend, "--json"
        )
        assert code == 0, err
        assert [s["id"] for s in report["adapters"][0]["migrations"]] == [expert_stacks.ID]
    written = [load_file(str(tmp_path / b / "model.safetensors")) for b in ("peft", "stream")]
    assert all(torch.equal(written[0][k], written[1][k]) for k in written[0])

    _assert_each_expert_merged(base, adapter, tmp_path / "stream", {"gate_proj": 3, "up_proj": 3, "down_proj": 3})
    if Version(INSTALLED) < HISTORY.boundary("per_expert_adapters_converted"):
        return  # that PEFT loads the per-expert tensors onto nothing: its own reading is no reference
    # independently of the migration: PEFT's own reading of the per-expert adapter
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(str(base)).eval()
    reference = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    merged = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path / "peft")).eval()
    inputs = probe_inputs(merged.config)
    with torch.no_grad():
        want, got = main_output(reference.base_model(**inputs)), main_output(merged(**inputs))
        plain = main_output(transformers.Qwen3MoeForCausalLM.from_pretrained(str(base)).eval()(**inputs))
    assert float((want - got).abs().max()) <= 1e-5 < float((want - plain).abs().max())


def test_verify_reads_the_per_expert_adapter_as_merge_does(per_expert, tmp_path, capsys):
    base, adapter = per_expert
    assert run_cli(capsys, "merge", base, adapter, "-o", tmp_path / "out")[0] == 0
    code, report, err = run_cli(capsys, "verify", base, adapter, tmp_path / "out", "--json")
    assert code == 0, err
    assert [s["id"] for s in report["adapter_migrations"]] == [expert_stacks.ID]


def test_the_input_adapter_is_left_as_it_was(per_expert, tmp_path, capsys):
    base, adapter = per_expert
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    assert run_cli(capsys, "merge", base, adapter, "-o", tmp_path / "out")[0] == 0
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_each_expert_keeps_its_own_scale_from_alpha_pattern(tmp_path, capsys):
    """alpha_pattern on the per-expert modules becomes each piece's scale, folded into the stack's B: the written
    expert weights are base + s·B·A with each module's own s (PEFT 0.21.2's own reading of such an adapter on
    transformers 5 drops the pattern: it warns that the key matched nothing)."""
    base, adapter = _per_expert(tmp_path, {"down_proj": 5})
    code, _, err = run_cli(capsys, "merge", base, adapter, "-o", tmp_path / "out", "--backend", "stream")
    assert code == 0, err
    _assert_each_expert_merged(base, adapter, tmp_path / "out", {"gate_proj": 3, "up_proj": 3, "down_proj": 5})


def _assert_each_expert_merged(base, adapter, out, alphas: dict) -> None:
    """Every expert's written weights are base + alpha/r·B·A of its own LoRA (float64, each piece on its own)."""
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for e in range(EXPERTS):
        for name, alpha in alphas.items():
            module = f"model.layers.1.mlp.experts.{e}.{name}"
            a, b = (lora[f"base_model.model.{module}.lora_{x}.weight"].double() for x in "AB")
            want = before[f"{module}.weight"].double() + alpha / RANK * (b @ a)
            assert float((after[f"{module}.weight"].double() - want).abs().max()) < 1e-6, module
