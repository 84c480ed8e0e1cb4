"""The independent combination reference agrees with PEFT's add_weighted_adapter where PEFT is right, and
catches it where it is not (rsLoRA sources)."""

from __future__ import annotations

import inspect
import math
import warnings

import peft
import pytest
import torch
from packaging.version import Version
from torch import nn

from safe_merge.errors import Unsupported
from safe_merge.io.loading import installed_peft
from safe_merge.verifier.combination_math import RANDOM, combined_delta
from safe_merge.verifier.combination_types import SAME_RANK, SVD, Combination
from safe_merge.verifier.delta import ModuleLora, low_rank_delta
from safe_merge.verifier.layer_kinds import layer_kinds
from tests.release import HISTORY, INSTALLED, combination_param, requires, weighted_adapter_options
from tests.strategies import FEATURES

# plain torch modules: 0.3.x wraps only models with a config
pytestmark = pytest.mark.skipif(not FEATURES["config_free_merge"], reason=f"peft {INSTALLED} needs model.config")
DETERMINISTIC = ["cat", "linear", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(6, 5)
        self.gpt = Conv1D(5, 6)
        self.emb = nn.Embedding(7, 4)


def _adapters(n: int, target: str, rank: int = 3, **lora):
    """A PeftModel holding n adapters a0..a{n-1} on one module, each with its own values and alpha."""
    torch.manual_seed(n)
    model, names = None, []
    for i in range(n):
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=2 + 3 * i,
            target_modules=[target],
            init_lora_weights=False,
            lora_dropout=0.0,
            fan_in_fan_out=target == "gpt",
            **lora,
        )
        name = f"a{i}"
        if model is None and "adapter_name" not in inspect.signature(peft.get_peft_model).parameters:
            model, name = peft.get_peft_model(Net(), config), "default"  # 0.3.x names its first adapter itself
        elif model is None:
            model = peft.get_peft_model(Net(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        names.append(name)
    layer = model.base_model.model.get_submodule(target)
    with torch.no_grad():
        for store in (layer.lora_B, layer.lora_embedding_B):
            for value in store.values():
                (value.weight if hasattr(value, "weight") else value).normal_()
    return model, layer, names


def _loras(layer, names, target) -> list[ModuleLora]:
    kind = layer_kinds(Net())[target]
    out = []
    for name in names:
        if target == "emb":
            a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        else:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        out.append(ModuleLora(target, kind, a.detach().double(), b.detach().double(), layer.scaling[name]))
    return out


@pytest.mark.parametrize("combination", [combination_param(c) for c in DETERMINISTIC])
@pytest.mark.parametrize("target", ["lin", "gpt", "emb"])
@pytest.mark.parametrize("n", [1, 3])
def test_reference_matches_peft_for_each_deterministic_type(combination, target, n):
    kind = Combination(combination, (1.0,) * n).effective_type(n)
    if target == "emb" and kind in SVD and HISTORY.affected("svd_combination_embedding_crashes", installed_peft()):
        pytest.skip("this release transposes svd-combined embeddings (merge refuses it: test_known_bugs)")
    if kind in SVD and HISTORY.affected("svd_combination_clamps", installed_peft()):
        pytest.skip("this release clamps svd-combined factors (merge refuses it: test_known_bugs)")
    model, layer, names = _adapters(n, target)
    weights = [0.7, -0.4, 1.3][:n]
    if combination in SAME_RANK and Version(installed_peft()) < HISTORY.boundary("negative_combination_weights"):
        weights = [abs(w) for w in weights]  # older releases take sqrt(w) for both factors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(
            names, weights, "combined", combination_type=combination, **weighted_adapter_options(0.5)
        )
    theirs = layer.get_delta_weight("combined").detach().double()
    loras = _loras(layer, names, target)
    if kind in SVD and HISTORY.affected("svd_combination_scale_twice", installed_peft()):
        # the release's known double scaling (refused by merge): each scaled delta weighted by w·s again
        weights = [w * lora.scale for w, lora in zip(weights, loras, strict=True)]
    ours = combined_delta(loras, weights, kind, density=0.5, release=installed_peft())
    scale = float(ours.abs().max())
    assert scale > 1e-3  # a real delta, not agreement on zeros
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5 * scale), float((ours - theirs).abs().max())


@pytest.mark.parametrize("combination", DETERMINISTIC + sorted(RANDOM))
def test_one_adapter_at_weight_w_is_w_times_its_own_delta(combination):
    _, layer, names = _adapters(1, "lin")
    (lora,) = _loras(layer, names, "lin")
    kind = Combination(combination, (0.6,)).effective_type(1)
    assert torch.allclose(combined_delta([lora], [0.6], kind, density=0.5), 0.6 * low_rank_delta(lora), atol=1e-12)


def test_a_module_only_one_of_several_adapters_targets_is_still_pruned_by_ties():
    _, layer, names = _adapters(1, "lin")
    (lora,) = _loras(layer, names, "lin")
    pruned = combined_delta([lora], [1.0], "ties", density=0.5)
    assert not torch.allclose(pruned, low_rank_delta(lora))


@requires("use_rslora")
def test_rslora_sources_expose_peft_overscaling_the_combined_adapter():
    model, layer, names = _adapters(1, "lin", rank=4, use_rslora=True)
    own = low_rank_delta(_loras(layer, names, "lin")[0])
    ours = combined_delta(_loras(layer, names, "lin"), [1.0], "cat")
    assert torch.allclose(ours, own, atol=1e-12)  # combining one adapter at weight 1 must give it back
    model.add_weighted_adapter(names, [1.0], "combined", combination_type="cat")
    ratio = float((layer.get_delta_weight("combined").double() / own).median())
    # PEFT 0.21.2 gives sqrt(r) = 2 here (huggingface/peft#3761); a fixed release gives 1
    assert math.isclose(ratio, 1.0, rel_tol=1e-4) or math.isclose(ratio, 2.0, rel_tol=1e-4), ratio


@pytest.mark.parametrize("combination", sorted(RANDOM))
def test_random_combinations_are_unverifiable_not_trusted(combination):
    _, layer, names = _adapters(2, "lin")
    with pytest.raises(Unsupported):
        combined_delta(_loras(layer, names, "lin"), [0.5, 0.5], combination, density=0.5)
