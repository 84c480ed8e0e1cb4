"""LoRA inits and variants that change what a merge means: each merges right or is refused before any work."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

from tests.helpers import materialize, merge_refused, run_cli, save_model
from tests.release import has_key
from tests.strategies import FEATURES, TINY, Case, build_base

LLAMA = Case("llama", TINY["two_layers"], False, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "float32", seed=3)


def _trained(config: peft.LoraConfig, base: torch.nn.Module) -> torch.nn.Module:
    """get_peft_model with ``config``, then lora_B moved off its init as training would."""
    model = peft.get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


@pytest.mark.skipif(not FEATURES["olora_init"], reason="the installed PEFT has no OLoRA init")
@pytest.mark.parametrize("backend", ["stream", "peft"])
def test_an_olora_adapter_saved_unconverted_is_refused_before_work(tmp_path, capsys, backend):
    base_dir, _ = materialize(LLAMA, tmp_path / "inputs")
    base = build_base(LLAMA)
    adapter = tmp_path / "inputs" / "olora"
    save_model(_trained(peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"), base), adapter)
    extra = ["--backend", backend, "--check-outputs", "never"]
    err = merge_refused(
        tmp_path, capsys, [base_dir, adapter], extra, "'olora'", "path_initial_model_for_weight_conversion"
    )
    assert "refused by rule: base-rewriting-init" in err


@pytest.mark.skipif(not FEATURES["olora_init"], reason="the installed PEFT has no OLoRA init")
def test_an_adapter_saved_converted_merges(tmp_path, capsys):
    """PEFT's conversion writes a plain LoRA of rank 2r on the unchanged base: merged and verified."""
    base_dir, _ = materialize(LLAMA, tmp_path / "inputs")
    base = build_base(LLAMA)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora")
    )
    initial = tmp_path / "inputs" / "initial"
    save_model(model, initial)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)
    adapter = tmp_path / "inputs" / "converted"
    model.save_pretrained(str(adapter), path_initial_model_for_weight_conversion=str(initial))
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] is True
    code, report, err = run_cli(capsys, "merge", base_dir, adapter, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    assert report["verification"]["outputs"]["max_abs"] <= report["verification"]["outputs"]["tol"]


def test_a_kasa_adapter_is_refused_naming_its_key(tmp_path, capsys):
    base_dir, adapter = materialize(LLAMA, tmp_path / "inputs")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["kasa_config"] = {"rank": 4}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    err = merge_refused(
        tmp_path, capsys, [base_dir, adapter], ["--check-outputs", "never"], "'kasa_config'", "truncated SVD"
    )
    assert "PeftModel.from_pretrained" in err


def test_verify_refuses_an_adapter_whose_init_rewrites_the_base(tmp_path, capsys):
    base_dir, adapter = materialize(LLAMA, tmp_path / "inputs")
    code, _, _ = run_cli(capsys, "merge", base_dir, adapter, "-o", tmp_path / "out")
    assert code == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa_niter_4"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "verify", base_dir, adapter, tmp_path / "out")
    assert code == 2, err
    assert "'pissa_niter_4'" in err and "init_lora_weights" in err


@pytest.mark.skipif(not FEATURES["trainable_tokens"], reason="the installed PEFT has no trainable tokens")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_tokens_merge_and_verify_row_by_row(tmp_path, capsys, tied):
    """The replaced rows match the saved rows and the rest is bit-equal; a tied LM head moves with its embedding."""
    case = Case("llama", TINY["one_layer"], tied, {"r": 4, "target_modules": ["q_proj"]}, "float32", seed=5)
    base = build_base(case)
    base_dir = tmp_path / "inputs" / "base"
    save_model(base, base_dir)
    adapter = tmp_path / "inputs" / "tokens"
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7], init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(0.5)
    save_model(model, adapter)
    code, report, err = run_cli(capsys, "merge", base_dir, adapter, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    assert report["ledger"]["replaced"] == 1 and report["ledger"]["unverified"] == 0, report["ledger"]
    assert report["verification"]["outputs"]["max_abs"] <= report["verification"]["outputs"]["tol"]

    # the same rows planted one off: the weight check alone names the embedding
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("trainable_tokens_delta"))
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(weights))
    code, report, err = run_cli(capsys, "verify", base_dir, adapter, tmp_path / "out", "--json")
    assert code == 1, err
    assert any("embed_tokens.weight" in f for f in report["verification"]["weights"]["failures"])


@pytest.mark.skipif(not has_key("layer_replication"), reason="the installed PEFT has no layer_replication (0.10+)")
def test_layer_replication_writes_each_copy_with_its_own_weights(tmp_path, capsys):
    """Better than PEFT, whose merge adds both copies' deltas into the one tensor they share: the merged model
    has the deeper stack, each layer its source layer's weights plus its own delta, and answers as the
    unmerged PeftModel does."""
    base_dir, _ = materialize(LLAMA, tmp_path / "inputs")
    base = build_base(LLAMA)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]])
    adapter = tmp_path / "inputs" / "replicated"
    save_model(_trained(config, base), adapter)
    code, report, err = run_cli(capsys, "merge", base_dir, adapter, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    assert report["backend"] == "peft"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    assert report["ledger"]["merged"] == 12 and report["ledger"]["unmatched"] == 0
    outputs = report["verification"]["outputs"]
    assert outputs["max_abs"] <= outputs["tol"] < outputs["adapter_effect"]

    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    one, two = (merged[f"model.layers.{i}.self_attn.q_proj.weight"] for i in (1, 2))
    assert not torch.equal(one, two), "the two copies of layer 1 must differ by their own deltas"
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], merged["model.layers.2.mlp.up_proj.weight"])
