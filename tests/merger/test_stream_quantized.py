"""Quantized bases read as stored (quant/stored/): merged by the stream backend under --quantized dequantize (a
float model, exact) and requantize (the base's format with fresh scales), verified, and read back by
transformers as they were verified; a requantize that forgets the scales or folds ΔW into the raw codes fails."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from safe_merge.io.checkpoint import Checkpoint
from safe_merge.io.loading import _dtype_kwarg
from safe_merge.quant.stored.fp8 import BlockFP8
from safe_merge.quant.stored.view import StoredView
from tests.quant.stored import checkpoints
from tests.release import converted_at_load, requires_release

CT_INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
CT_INT4_ASYM = {**CT_INT4, "symmetric": False}
CT_FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
CT_NVFP4 = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
            "scale_dtype": "float8_e4m3fn"}  # fmt: skip
FORMATS = {
    "fp8 blocks of 32": lambda f, out: checkpoints.fp8_block(f, out),
    "fp8 blocks of 48 (ceil grid)": lambda f, out: checkpoints.fp8_block(f, out, (48, 48)),
    "int4 groups of 32": lambda f, out: checkpoints.compressed(f, out, CT_INT4, "pack-quantized"),
    "int4 groups of 32, zero points": lambda f, out: checkpoints.compressed(f, out, CT_INT4_ASYM, "pack-quantized"),
    "fp8 per channel": lambda f, out: checkpoints.compressed(f, out, CT_FP8, "float-quantized"),
    "nvfp4": lambda f, out: checkpoints.compressed(f, out, CT_NVFP4, "nvfp4-pack-quantized"),
}
# transformers reads these back as safe-merge does; it infers FP8 blocks from rows // scale rows (wrong for 48)
TRANSFORMERS_READS = {"fp8 blocks of 32", "int4 groups of 32", "int4 groups of 32, zero points", "fp8 per channel",
                      "nvfp4"}  # fmt: skip

pytestmark = requires_release("stream_backend_matches")  # stored formats, workers and journals are its


def base_for(name, llama_pair, tmp_path):
    if name != "fp8 blocks of 32" and name != "fp8 blocks of 48 (ceil grid)":
        pytest.importorskip("compressed_tensors", reason="compressed-tensors writes these (the quant extra)")
    else:
        pytest.importorskip("transformers.integrations.finegrained_fp8")
    return FORMATS[name](llama_pair[0], tmp_path / "base")


@pytest.mark.parametrize("name", FORMATS)
def test_a_stored_quantized_base_merges_into_a_verified_float_model(name, llama_pair, tmp_path, cli):
    base = base_for(name, llama_pair, tmp_path)
    code, report, err = cli("merge", base, llama_pair[1], "-o", tmp_path / "out", "--json")
    assert code == 0, err
    assert report["backend"] == "stream" and report["quantization"]["policy"] == "dequantize"
    assert report["verification"]["weights"]["exact"] == {"merge_and_unload()": 6}
    assert report["verification"]["outputs"]["passed"] is True
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    written = Checkpoint(tmp_path / "out")
    assert {i.dtype for i in written.tensors.values()} == {torch.bfloat16}
    assert set(written.tensors) == set(load_file(str(llama_pair[0] / "model.safetensors")))


@pytest.mark.parametrize("name", FORMATS)
def test_requantize_writes_the_base_format_with_fresh_scales_and_untouched_parts_as_stored(
    name, llama_pair, tmp_path, cli
):
    base = base_for(name, llama_pair, tmp_path)
    out = tmp_path / "out"
    code, report, err = cli("merge", base, llama_pair[1], "-o", out, "--quantized", "requantize", "--json")
    assert code == 0, err
    weights = report["verification"]["weights"]
    assert weights["checked_tensors"] == 6 and weights["passed"] and "rounding budget" in weights["tol_rule"]
    assert report["stream"]["tensors"]["requantized"] == 6
    stored, written = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert {k: (v.dtype, v.shape) for k, v in stored.items()} == {k: (v.dtype, v.shape) for k, v in written.items()}
    for key, value in stored.items():  # k, o, gate and up projections: not targeted, copied as stored
        if not any(t in key for t in checkpoints.TARGETS):
            assert torch.equal(value.view(torch.uint8), written[key].view(torch.uint8)), key
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]
        == json.loads((base / "config.json").read_text())["quantization_config"]
    )
    if name in TRANSFORMERS_READS:
        from transformers import AutoModelForCausalLM

        config = json.loads((out / "config.json").read_text())
        kwargs = {}
        if config["quantization_config"]["quant_method"] == "compressed-tensors":  # as the base loads on a CPU
            from transformers import CompressedTensorsConfig

            kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
        loaded = AutoModelForCausalLM.from_pretrained(out, **{_dtype_kwarg(): torch.bfloat16}, **kwargs).state_dict()
        view = StoredView(Checkpoint(out), config["quantization_config"], torch.bfloat16)
        for group in view.groups:  # what transformers loads is what the verifier checked
            assert torch.equal(loaded[group], view.read(group)), group


def stale(monkeypatch, base, how):
    """A broken requantize: fresh codes beside the base's old scales, or ΔW added to the raw e4m3 codes."""
    tensors = load_file(str(base / "model.safetensors"))
    original = BlockFP8.quantize

    def broken(self, group, weight, stored):
        old = {role: tensors[name] for role, name in group.parts.items()}
        if how == "scales not updated":
            return {**original(self, group, weight, stored), "scale": old["scale"]}
        start = self.dequantize(group, old, weight.dtype)
        codes = (old["weight"].float() + (weight.float() - start.float())).to(torch.float8_e4m3fn)
        return {"weight": codes, "scale": old["scale"]}

    monkeypatch.setattr(BlockFP8, "quantize", broken)


@pytest.mark.parametrize("how", ["scales not updated", "delta folded into the raw fp8 codes"])
def test_a_broken_fp8_requantize_fails_naming_the_tensor(how, llama_pair, tmp_path, cli, monkeypatch):
    base = base_for("fp8 blocks of 32", llama_pair, tmp_path)
    stale(monkeypatch, base, how)
    code, report, err = cli("merge", base, llama_pair[1], "-o", tmp_path / "out", "--quantized", "requantize", "--json")
    assert code == 1
    failures = " ".join(report["verification"]["weights"]["failures"])
    assert "model.layers.0.self_attn.q_proj.weight" in failures
    # stale scales put the values off their budget; ΔW in raw codes is shrunk by the scale, so it is lost
    assert "beyond its rounding budget" in failures
    if how != "scales not updated":
        assert "left it unchanged" in failures or "relative 1" in failures
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["tiny-gptq-asym", "tiny-gptq-sym-descact", "tiny-awq-asym"])
@pytest.mark.parametrize("policy", ["dequantize", "requantize"])
def test_gptq_and_awq_checkpoints_merge_under_both_policies(name, policy, tmp_path, cli):
    base, adapter = checkpoints.library_written(name, tmp_path)
    out = tmp_path / "out"
    code, report, err = cli("merge", base, adapter, "-o", out, "--quantized", policy, "--json")
    assert code == 0, err
    assert report["backend"] == "stream" and report["verification"]["outputs"]["passed"] is True
    written = load_file(str(out / "model.safetensors"))
    stored = load_file(str(base / "model.safetensors"))
    if policy == "dequantize":
        assert report["verification"]["weights"]["exact"] == {"merge_and_unload()": 6}
        assert not any(k.endswith(".qweight") for k in written)
        return
    assert report["stream"]["tensors"]["requantized"] == 6
    assert {k: (v.dtype, v.shape) for k, v in stored.items()} == {k: (v.dtype, v.shape) for k, v in written.items()}
    for key, value in stored.items():
        if not any(t in key for t in checkpoints.TARGETS) or key.endswith("g_idx"):
            assert torch.equal(value, written[key]), key


@pytest.mark.parametrize("policy", ["dequantize", "requantize"])
def test_gpt_oss_mxfp4_experts_are_dequantized_or_kept_as_stored_around_an_attention_lora(policy, tmp_path, cli):
    pytest.importorskip("transformers.models.gpt_oss")
    base, adapter = checkpoints.gpt_oss_mxfp4(tmp_path)
    out = tmp_path / "out"
    code, report, err = cli("merge", base, adapter, "-o", out, "--quantized", policy, "--json")
    assert code == 0, err
    assert report["verification"]["outputs"]["passed"] is True
    stored, written = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    experts = [k for k in stored if k.endswith(("_blocks", "_scales"))]
    assert len(experts) == 8
    if policy == "requantize":  # the adapter leaves the experts alone: their blocks and scales are the base's
        assert all(torch.equal(stored[k], written[k]) for k in experts)
    else:
        assert not any(k.endswith(("_blocks", "_scales")) for k in written)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, **{_dtype_kwarg(): torch.bfloat16}).state_dict()
    view = StoredView(Checkpoint(base), json.loads((base / "config.json").read_text())["quantization_config"],
                      torch.bfloat16)  # fmt: skip
    for group in view.groups:  # transformers reads the experts as the codec does (dequantize: as written)
        assert torch.equal(loaded[group], view.read(group)), group


@converted_at_load
@pytest.mark.parametrize("policy", ["dequantize", "requantize"])
def test_a_lora_on_fp8_experts_stored_per_expert_merges_expert_by_expert(policy, tmp_path, cli):
    """DeepSeek-V3's layout: each expert's projections in block FP8; the LoRA on the fused stacks
    (target_parameters) lands on every expert's pieces, dequantized, merged and (requantize) quantized again."""
    import copy

    import peft

    from tests.helpers import save_model
    from tests.moe import fused, tiny_moe
    from tests.release import has_key

    if not has_key("target_parameters") or not fused("qwen3_moe"):
        pytest.skip("needs PEFT 0.17+ (target_parameters) and transformers 5 (fused experts)")
    pytest.importorskip("transformers.integrations.finegrained_fp8")
    base = tiny_moe("qwen3_moe").to(torch.bfloat16)
    save_model(base, tmp_path / "float")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base).float(), lora)
    save_model(model, tmp_path / "adapter")
    quantized = checkpoints.fp8_block(tmp_path / "float", tmp_path / "base", (8, 8))
    out = tmp_path / "out"
    code, report, err = cli("merge", quantized, tmp_path / "adapter", "-o", out, "--quantized", policy, "--json")
    assert code == 0, err
    weights = report["verification"]["weights"]
    pieces = 2 * 4 * 3  # layers x experts x (gate, up, down)
    assert weights["checked_tensors"] == pieces + 2 and weights["passed"]
    if policy == "requantize":
        assert report["stream"]["tensors"]["requantized"] == pieces + 2


@converted_at_load
@pytest.mark.parametrize("policy", ["dequantize", "requantize"])
def test_a_lora_on_gpt_oss_expert_stacks_merges_into_float_and_mxfp4_stacks(policy, tmp_path, cli):
    """gpt-oss stores each expert stack whole ([E, in, out]); the stream backend merges a target_parameters LoRA
    there with PEFT's own einsum: bit for bit the PEFT backend on the float model, and into MXFP4 stacks under
    both policies (requantized stacks checked against their budget)."""
    pytest.importorskip("transformers.models.gpt_oss")
    from safe_merge.compat.history import History
    from safe_merge.io.loading import installed_peft
    from tests.release import has_key

    if not has_key("target_parameters"):
        pytest.skip("needs PEFT 0.17+ (target_parameters)")
    if History.load().affected("param_wrapper_assumes_in_out", installed_peft()):
        pytest.skip("PEFT before 0.19 reads a stack the other way round: the stream backend leaves it to PEFT's")
    import peft
    from transformers import GptOssForCausalLM

    base, _ = checkpoints.gpt_oss_mxfp4(tmp_path)
    float_dir = tmp_path / "float-gpt-oss"
    model = GptOssForCausalLM.from_pretrained(float_dir, **{_dtype_kwarg(): torch.float32})
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=targets, init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "experts-adapter")
    adapter = tmp_path / "experts-adapter"
    code, report, err = cli("merge", base, adapter, "-o", tmp_path / "out", "--quantized", policy, "--json")
    assert code == 0, err
    assert report["backend"] == "stream" and report["verification"]["weights"]["checked_tensors"] == 6
    stored, written = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    if policy == "requantize":
        assert report["stream"]["tensors"]["requantized"] == 4
        assert not torch.equal(stored["model.layers.0.mlp.experts.down_proj_blocks"],
                               written["model.layers.0.mlp.experts.down_proj_blocks"])  # fmt: skip
        return
    outs = {}
    for backend in ("stream", "peft"):
        out = tmp_path / f"float-{backend}"
        code, _, err = cli("merge", float_dir, adapter, "-o", out, "--backend", backend, "--no-card")
        assert code == 0, err
        outs[backend] = load_file(str(out / "model.safetensors"))
    assert outs["stream"].keys() == outs["peft"].keys()
    assert all(torch.equal(outs["stream"][k], outs["peft"][k]) for k in outs["peft"])


@pytest.mark.parametrize("policy", ["dequantize", "requantize"])
def test_verify_checks_a_stored_format_merge_and_names_a_tampered_weight(policy, llama_pair, tmp_path, cli):
    base = base_for("int4 groups of 32", llama_pair, tmp_path)
    out = tmp_path / "out"
    assert cli("merge", base, llama_pair[1], "-o", out, "--quantized", policy)[0] == 0
    code, report, err = cli("verify", base, llama_pair[1], out, "--json")
    assert code == 0, err
    assert report["verification"]["weights"]["checked_tensors"] == 6
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.v_proj." + ("weight_scale" if policy == "requantize" else "weight")
    tensors[name] = tensors[name] * 1.25  # a scale (or a weight) off by a quarter
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    code, report, err = cli("verify", base, llama_pair[1], out, "--json")
    assert code == 1
    assert "model.layers.1.self_attn.v_proj.weight" in " ".join(report["verification"]["weights"]["failures"])


def test_plan_names_the_format_the_policy_and_the_output_size(llama_pair, tmp_path, cli):
    base = base_for("fp8 blocks of 32", llama_pair, tmp_path)
    sizes = {}
    for policy in ("dequantize", "requantize"):
        code, report, err = cli(
            "merge", base, llama_pair[1], "-o", tmp_path / "out", "--plan", "--quantized", policy, "--json"
        )
        assert code == 0, err
        assert report["backend"] == "stream"
        assert report["quantization"]["read_as_stored"] == "fp8_block" and report["quantization"]["policy"] == policy
        assert "blocks of 32x32" in report["quantization"]["scheme"]
        sizes[policy] = report["output"]["estimated_bytes"]
    stored = sum(v.numel() * v.element_size() for v in load_file(str(base / "model.safetensors")).values())
    floats = sum(v.numel() * 2 for v in load_file(str(llama_pair[0] / "model.safetensors")).values())
    assert sizes == {"requantize": stored, "dequantize": floats}
    assert not (tmp_path / "out").exists()


def test_a_saved_copy_of_a_quantized_layer_is_requantized_from_the_copy(llama_pair, tmp_path, cli):
    """modules_to_save on a quantized projection: the adapter's full copy replaces the weight, and is what the
    base's format gets written back from (and checked against)."""
    import peft
    from transformers import LlamaForCausalLM

    base = base_for("fp8 blocks of 32", llama_pair, tmp_path)
    model = LlamaForCausalLM.from_pretrained(llama_pair[0], **{_dtype_kwarg(): torch.float32})
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["down_proj"])
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "modules_to_save" in name and name.endswith("weight"):
                param.add_(0.05)  # the copy was trained away from the base
    lora.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    code, report, err = cli("merge", base, tmp_path / "adapter", "-o", out, "--quantized", "requantize", "--json")
    assert code == 0, err
    assert report["stream"]["tensors"]["requantized"] == 4  # two q_proj, two down_proj copies
    view = StoredView(Checkpoint(out), json.loads((out / "config.json").read_text())["quantization_config"],
                      torch.bfloat16)  # fmt: skip
    copy = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    saved = next(v for k, v in copy.items() if "layers.0.mlp.down_proj" in k)
    written = view.read("model.layers.0.mlp.down_proj.weight").float()
    assert (written - saved.float()).abs().max() <= saved.abs().max() * 2**-3  # within e4m3 rounding of the copy
