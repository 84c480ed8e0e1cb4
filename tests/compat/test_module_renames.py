"""Adapters that name a module the installed transformers renamed (GPT-NeoX's embed_out is lm_head from
transformers 5.14): renamed as the base's keys are, never dropped."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file, save_file

from safe_merge.compat.migrations import module_renames
from tests.helpers import run_cli, save_model

RENAMES = Version(transformers.__version__) >= Version(module_renames.renames()[0]["first"])


@pytest.fixture
def neox_with_old_head(tmp_path):
    """A GPT-NeoX base and an adapter whose saved LM head is keyed embed_out, as adapters trained before the
    rename are."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=32,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    base = transformers.GPTNeoXForCausalLM(config).eval()
    head = "lm_head" if RENAMES else "embed_out"
    save_model(base, tmp_path / "base")
    lora = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["query_key_value"],
        modules_to_save=[head],
        init_lora_weights=False,
        lora_dropout=0.0,
    )  # (0.3 defaults lora_alpha and lora_dropout to None, which its own layers cannot use)
    model = peft.get_peft_model(copy.deepcopy(base), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.3)
    adapter = tmp_path / "adapter"
    save_model(model, adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.replace(f"model.{head}.", "model.embed_out."): v for k, v in tensors.items()}, str(weights))
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "modules_to_save": ["embed_out"]}))
    return tmp_path / "base", adapter


def test_a_saved_embed_out_lands_on_the_lm_head_the_installed_transformers_builds(neox_with_old_head, tmp_path, capsys):
    base, adapter = neox_with_old_head
    code, report, err = run_cli(capsys, "merge", base, adapter, "-o", tmp_path / "out", "--backend", "peft", "--json")
    assert code == 0, err
    steps = [s["id"] for s in report["adapters"][0]["migrations"]]
    assert (module_renames.ID in steps) == RENAMES, steps
    assert report["ledger"]["replaced"] == 1 and report["ledger"]["unmatched"] == 0
    outputs = report["verification"]["outputs"]
    assert outputs["max_abs"] <= outputs["tol"] < outputs["adapter_effect"]


def test_verify_reads_the_old_names_as_merge_does(neox_with_old_head, tmp_path, capsys):
    base, adapter = neox_with_old_head
    assert run_cli(capsys, "merge", base, adapter, "-o", tmp_path / "out")[0] == 0
    code, report, err = run_cli(capsys, "verify", base, adapter, tmp_path / "out", "--json")
    assert code == 0, err
    assert (module_renames.ID in [s["id"] for s in report["adapter_migrations"]]) == RENAMES


def test_the_input_adapter_keeps_its_old_names(neox_with_old_head, tmp_path, capsys):
    base, adapter = neox_with_old_head
    before = (adapter / "adapter_config.json").read_bytes(), (adapter / "adapter_model.safetensors").read_bytes()
    run_cli(capsys, "merge", base, adapter, "-o", tmp_path / "out")
    after = (adapter / "adapter_config.json").read_bytes(), (adapter / "adapter_model.safetensors").read_bytes()
    assert before == after
