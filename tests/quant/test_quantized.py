"""Quantized bases (bitsandbytes 4-bit and 8-bit, torchao int8, HQQ): detected with method and bits, merged by
each policy, measured against budgets that follow from the method, and failed when the merge lost the adapter or
moved weights beyond what rounding explains. Needs the `quant` extra; each backend skips cleanly without it."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safe_merge.cli import main
from safe_merge.compat.adapter_files import load_adapter
from safe_merge.io import loading
from safe_merge.merger.backends import peft as backend_peft
from safe_merge.merger.pipeline import MergeRequest, merge_command
from safe_merge.quant.formats import detect, float_twin
from safe_merge.quant.grids import grid, rounding_budget
from safe_merge.verifier import quantized as quantized_check
from tests import stats
from tests.helpers import digest, save_adapter, save_model
from tests.release import requires_release
from tests.strategies import Case, build_base

SIZES = {"vocab": 64, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"]}
BACKENDS = {"bnb4": "bitsandbytes", "bnb8": "bitsandbytes", "torchao": "torchao", "hqq": "hqq"}
pytestmark = pytest.mark.quant


def _needs(backend: str):
    library = BACKENDS[backend]
    return pytest.mark.skipif(importlib.util.find_spec(library) is None, reason=f"{library} is not installed")


def _quantization_config(backend: str):
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if backend == "bnb4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if backend == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _quantized_inputs(root: Path, backend: str, delta_scale: float = 0.6, seed: int = 3) -> tuple[Path, Path]:
    """A base checkpoint saved quantized by ``backend`` (as a user would download it) and an adapter trained on
    its float original."""
    case = Case("llama", SIZES, False, LORA, "float32", seed=seed, delta_scale=delta_scale)
    base = build_base(case)
    save_model(base, root / "float")
    save_adapter(case, base, root / "adapter")
    cls = loading.model_class(loading.read_model_config(root / "float"))
    quantized = cls.from_pretrained(
        str(root / "float"), quantization_config=_quantization_config(backend), dtype=torch.float32
    )
    save_model(quantized, root / "base")
    return root / "base", root / "adapter"


@pytest.fixture(scope="module", params=[p for p in ("bnb4", "bnb8", "torchao")])
def quantized_inputs(request, tmp_path_factory):
    backend = request.param
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        pytest.skip(f"{BACKENDS[backend]} is not installed")
    return backend, *_quantized_inputs(tmp_path_factory.mktemp(backend), backend)


@pytest.mark.parametrize("policy", ["dequantize", "requantize"])
def test_each_policy_merges_measures_and_warns_with_numbers(quantized_inputs, tmp_path, cli, policy):
    backend, base, adapter = quantized_inputs
    before = digest(base, adapter)
    code, report, err = cli("merge", base, adapter, "-o", tmp_path / "out", "--quantized", policy, "--json")
    assert code == 0 and report["status"] == "passed", err
    quant = report["quantization"]
    assert (quant["method"], quant["bits"], quant["policy"]) == (
        BACKENDS[backend],
        4 if backend == "bnb4" else 8,
        policy,
    )
    outputs = quant["outputs"]
    assert outputs["max_abs"] <= outputs["budget"]
    if policy == "dequantize":  # exact up to float rounding: the output check alone tells a merge from none
        assert outputs["budget"] < outputs["adapter_effect"]
    else:  # rounding again can cost as much as the adapter moves; the weights must still carry most of ΔW
        assert quant["min_survival"] >= 0.5
    warning = next(w for w in report["warnings"] if w.startswith("quantized base"))
    assert f"merged by {policy}" in warning and "budget" in warning
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ("quantization_config" in written) == (policy == "requantize")
    assert digest(base, adapter) == before
    stats.record_quantized(backend, policy, quant)


def test_refuse_exits_2_naming_method_and_bits(quantized_inputs, tmp_path, cli):
    backend, base, adapter = quantized_inputs
    code, _, err = cli("merge", base, adapter, "-o", tmp_path / "out", "--quantized", "refuse")
    bits = "4-bit" if backend == "bnb4" else "8-bit"
    assert code == 2 and BACKENDS[backend] in err and bits in err and "quantization_config" in err
    assert not (tmp_path / "out").exists()


@_needs("bnb4")
def test_requantizing_a_delta_below_the_quantization_step_fails_and_dequantize_keeps_it(tmp_path, cli):
    base, adapter = _quantized_inputs(tmp_path, "bnb4", delta_scale=1e-5)
    code, report, err = cli("merge", base, adapter, "-o", tmp_path / "lost", "--quantized", "requantize", "--json")
    assert code == 1 and not (tmp_path / "lost").exists(), err
    # a few elements still cross a level, so it is "carries 2% of ΔW" more often than "unchanged"; either fails
    lost = [p for p in report["problems"] if "--quantized dequantize" in p]
    assert lost and all("carries" in p or "left it unchanged" in p for p in lost), report["problems"]
    code, report, err = cli("merge", base, adapter, "-o", tmp_path / "kept", "--quantized", "dequantize", "--json")
    assert code == 0, err


@_needs("bnb4")
def test_a_merge_that_changed_nothing_fails_naming_the_layer(tmp_path, cli, monkeypatch):
    base, adapter = _quantized_inputs(tmp_path, "bnb4")
    monkeypatch.setattr(backend_peft, "merge_and_unload", lambda peft_model, *_: peft_model.unload())
    code, report, err = cli("merge", base, adapter, "-o", tmp_path / "out", "--quantized", "requantize", "--json")
    assert code == 1, err
    assert any(
        p.startswith("model.layers.0.self_attn.q_proj.weight: the merge left it unchanged") for p in report["problems"]
    )


@_needs("bnb4")
def test_a_merge_that_moved_weights_far_more_than_the_delta_fails(tmp_path, cli, monkeypatch):
    base, adapter = _quantized_inputs(tmp_path, "bnb4")
    real = backend_peft.merge_and_unload

    def twice(peft_model, *args):  # the adapter applied twice: weights move by 2ΔW
        for module in peft_model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {k: 2 * v for k, v in module.scaling.items()}
        return real(peft_model, *args)

    monkeypatch.setattr(backend_peft, "merge_and_unload", twice)
    code, report, err = cli("merge", base, adapter, "-o", tmp_path / "out", "--quantized", "requantize", "--json")
    assert code == 1, err
    assert any("beyond its rounding budget" in p for p in report["problems"]), report["problems"]


def test_a_quantized_base_without_its_library_says_what_to_install(tmp_path, capsys):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    case = Case("llama", SIZES, False, LORA, "float32", seed=3)
    base = build_base(case)
    save_model(base, tmp_path / "base")
    save_adapter(case, base, tmp_path / "adapter")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")]) == 2
    assert "bitsandbytes is not installed" in capsys.readouterr().err


def _hqq_base(case: Case, targets: list[str]):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = build_base(case)
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] in targets:
            parent, _, child = name.rpartition(".")
            config = BaseQuantizeConfig(nbits=4, group_size=16)
            with torch.no_grad():  # HQQ builds its packed weights from the float ones
                quantized = HQQLinear(module, quant_config=config, compute_dtype=torch.float32, device="cpu")
            setattr(model.get_submodule(parent), child, quantized)
    return model


@_needs("hqq")
@pytest.mark.parametrize("policy", ["dequantize", "requantize"])
def test_hqq_layers_merge_within_budget_by_each_policy(tmp_path, policy):
    case = Case("llama", SIZES, False, LORA, "float32", seed=4)
    save_adapter(case, build_base(case), tmp_path / "adapter")
    base_q = _hqq_base(case, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    quant = detect(base_q.config, base_q)
    assert (quant.method, quant.bits) == ("hqq", 4)
    model = copy.deepcopy(base_q)
    if policy == "dequantize":
        model = float_twin(model, torch.float32)
    merged, _ = backend_peft.merge_model(model, load_adapter(tmp_path / "adapter"))
    inputs = {"input_ids": torch.arange(24).reshape(2, 12) % SIZES["vocab"]}
    result = quantized_check.verify_loaded(base_q, merged, tmp_path / "adapter", quant, policy, torch.float32, inputs)
    assert result.status == "passed", result.problems
    check = result.quantized
    assert check.output_max <= check.output_budget < check.effect
    stats.record_quantized("hqq", policy, check.report())


@_needs("bnb4")
def test_the_4_bit_budget_is_half_the_widest_gap_of_the_code_per_block():
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_model(LlamaForCausalLM(config), Path(tmp))
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=qc, dtype=torch.float32)
    layer = model.model.layers[0].self_attn.q_proj
    levels = grid(layer)
    assert levels[:2] == ("flat", 64) and math.isclose(levels[2], 1.0 - 0.6961928009986877, rel_tol=1e-6)
    exact = torch.zeros(64, 64, dtype=torch.float64)
    exact[0, 0] = 2.0  # one block's absmax is 2, every other block is 0
    budget = rounding_budget(levels, exact)
    assert math.isclose(float(budget[0, 1]), levels[2] / 2 * 2.0) and float(budget[1].max()) == 0.0


@st.composite
def quantized_cases(draw):
    backend = draw(st.sampled_from([b for b in ("bnb4", "bnb8", "torchao") if importlib.util.find_spec(BACKENDS[b])]))
    heads = draw(st.sampled_from([2, 4]))  # bitsandbytes' CPU kernels want 64-wide blocks
    hidden = draw(st.sampled_from([64, 128]))
    sizes = {"vocab": draw(st.integers(24, 64)), "hidden": hidden, "layers": draw(st.integers(1, 2)), "heads": heads}
    # ... and every quantized layer's output width a multiple of 64 (its 4-bit CPU kernel asserts it)
    sizes["kv_heads"] = draw(
        st.sampled_from([h for h in (1, 2, heads) if heads % h == 0 and h * hidden // heads % 64 == 0])
    )
    targets = draw(
        st.lists(
            st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    lora = {"r": draw(st.integers(1, 8)), "lora_alpha": draw(st.sampled_from([4, 8, 16])), "target_modules": targets}
    case = Case(
        "llama", sizes, False, lora, "float32", draw(st.integers(0, 2**16)), draw(st.sampled_from([0.5, 1.0, 2.0]))
    )
    return backend, case, draw(st.sampled_from(["dequantize", "requantize"]))


@pytest.mark.skipif(
    not any(importlib.util.find_spec(BACKENDS[b]) for b in ("bnb4", "torchao")), reason="no quantization library"
)
@pytest.mark.property
@settings(max_examples=max(2, settings.default.max_examples // 8))  # each example loads a model a dozen times
@given(drawn=quantized_cases())
def test_drawn_adapters_on_quantized_bases_warn_and_hold_their_budget(drawn):
    backend, case, policy = drawn
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_base(case)
        save_model(base, root / "float")
        save_adapter(case, base, root / "adapter")
        cls = loading.model_class(loading.read_model_config(root / "float"))
        qc = _quantization_config(backend)
        save_model(cls.from_pretrained(str(root / "float"), quantization_config=qc, dtype=torch.float32), root / "base")
        report = merge_command(
            MergeRequest(str(root / "base"), [str(root / "adapter")], root / "out", quantized=policy)
        )
    assert report["status"] == "passed", report.get("problems")
    quant = report["quantization"]
    assert quant["outputs"]["max_abs"] <= quant["outputs"]["budget"]
    assert any(w.startswith(f"quantized base ({BACKENDS[backend]}") for w in report["warnings"])
    stats.record_quantized(backend, policy, quant)


@pytest.mark.parametrize(
    ("quantization_config", "needle"),
    [
        ({"quant_method": "eetq", "bits": 8}, "eetq, 8-bit"),
        ({"quant_method": "vptq", "bits": 2}, "vptq, 2-bit"),
    ],
)
def test_a_method_safe_merge_cannot_dequantize_is_refused_naming_it(tmp_path, cli, quantization_config, needle):
    case = Case("llama", SIZES, False, LORA, "float32", seed=3)
    base = build_base(case)
    save_model(base, tmp_path / "base")
    save_adapter(case, base, tmp_path / "adapter")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    for policy in ("dequantize", "requantize"):
        code, _, err = cli(
            "merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out", "--quantized", policy
        )
        assert code == 2 and needle in err and "cannot dequantize or merge into" in err, err
        assert not (tmp_path / "out").exists()


@requires_release("stream_backend_matches")  # stored formats are the stream backend's
@pytest.mark.parametrize("method", ["gptq", "awq", "fp8"])
def test_a_config_declaring_a_stored_format_over_float_weights_is_refused(tmp_path, cli, method):
    case = Case("llama", SIZES, False, LORA, "float32", seed=3)
    base = build_base(case)
    save_model(base, tmp_path / "base")
    save_adapter(case, base, tmp_path / "adapter")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    quant = {"quant_method": method, "bits": 4, "group_size": 128}
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    code, _, err = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    assert code == 2 and f"declares quant_method {method!r}" in err and "no tensor" in err, err
    assert not (tmp_path / "out").exists()
