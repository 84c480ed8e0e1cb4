"""The float64 reference delta agrees with PEFT's own layers for every layer kind and scaling rule."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn

from safe_merge.compat.scaling import pattern_value, scaling
from safe_merge.verifier.delta import LayerKind, ModuleLora, low_rank_delta
from safe_merge.verifier.layer_kinds import layer_kinds
from tests.release import base_layer
from tests.strategies import FEATURES


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(6, 5)
        self.gpt = Conv1D(5, 6)  # nx=6 in, nf=5 out, weight stored [in, out]
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv2d(2, 3, kernel_size=3)


@pytest.mark.skipif(not FEATURES["config_free_merge"], reason="peft 0.3 wraps only models with a config")
@pytest.mark.parametrize("target", ["lin", "gpt", "emb", "conv"])
def test_reference_delta_matches_peft_for_each_layer_kind(target):
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=[target], init_lora_weights=False, fan_in_fan_out=target == "gpt"
    )
    model = peft.get_peft_model(Net(), config)
    layer = model.base_model.model.get_submodule(target)
    kinds = layer_kinds(Net())
    if target == "emb":
        a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        with torch.no_grad():
            b.normal_()
    else:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    lora = ModuleLora(target, kinds[target], a.detach().double(), b.detach().double(), layer.scaling["default"])
    ours = low_rank_delta(lora)
    theirs = layer.get_delta_weight("default").detach().double()
    assert ours.shape == theirs.shape == base_layer(layer).weight.shape
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 1e-3  # a real delta, not an agreement on zeros


def test_layer_kinds_know_gpt2_conv1d_as_fan_in_fan_out():
    kinds = layer_kinds(Net())
    assert kinds == {
        "lin": LayerKind.LINEAR,
        "gpt": LayerKind.LINEAR_FIFO,
        "emb": LayerKind.EMBEDDING,
        "conv": LayerKind.CONV,
    }


def test_scaling_follows_rslora_and_alpha_pattern():
    config = {"lora_alpha": 16, "alpha_pattern": {"layers.0.q_proj": 4}}
    assert scaling(config, "model.layers.1.q_proj", 4) == 4.0
    assert scaling(config, "model.layers.0.q_proj", 4) == 1.0
    assert scaling({**config, "use_rslora": True}, "model.layers.1.q_proj", 4) == 16 / math.sqrt(4)


def test_pattern_keys_match_only_at_a_dot_boundary():
    patterns = {"q_proj": 2}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value(patterns, "model.layers.0.self_attn.xq_proj", 8) == 8
