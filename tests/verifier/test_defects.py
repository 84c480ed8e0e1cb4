"""A verifier that cannot be fooled: defects written into a real merged checkpoint are each caught, with exit 1
and the tensor named, by `safe-merge verify`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safe_merge.merger.pipeline import MergeRequest, merge_command
from tests.helpers import materialize, save_model
from tests.strategies import FEATURES, TINY, Case

SIZES = TINY["two_layers"]
Q = "model.layers.1.self_attn.q_proj.weight"


def _merged(root: Path, case: Case) -> tuple[Path, Path, Path]:
    base_dir, adapter_dir = materialize(case, root)
    out = root / "merged"
    report = merge_command(MergeRequest(str(base_dir), [str(adapter_dir)], out))
    assert report["status"] == "passed", report["problems"]
    return base_dir, adapter_dir, out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama merge with rsLoRA at r=4 (so α/√r and α/r differ by 2x) on square q_proj and on v_proj."""
    case = Case(
        "llama",
        SIZES,
        False,
        {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
        "float32",
        seed=3,
        delta_scale=1.0,
    )
    return _merged(tmp_path_factory.mktemp("llama"), case)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A BERT sequence classifier: its head is in modules_to_save (PEFT adds it for SEQ_CLS)."""
    case = Case(
        "bert_cls",
        SIZES,
        False,
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "float32",
        seed=5,
        delta_scale=1.0,
    )
    return _merged(tmp_path_factory.mktemp("bert"), case)


def _tamper(merged: Path, dest: Path, edit) -> Path:
    """Copy a merged checkpoint and rewrite its tensors with ``edit(tensors)``."""
    shutil.copytree(merged, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _base_tensors(base: Path) -> dict[str, torch.Tensor]:
    return load_file(str(base / "model.safetensors"))


def test_untouched_merge_passes(llama, cli):
    code, report, _ = cli("verify", *llama, "--json")
    assert (code, report["status"]) == (0, "passed")


def test_layer_left_unmerged_is_caught(llama, tmp_path, cli):
    base, adapter, merged = llama
    bad = _tamper(merged, tmp_path / "bad", lambda t: t.__setitem__(Q, _base_tensors(base)[Q].clone()))
    code, report, _ = cli("verify", base, adapter, bad, "--json")
    assert code == 1 and report["status"] == "failed"
    assert any(p.startswith(Q) for p in report["problems"]), report["problems"]


def test_delta_applied_twice_is_caught(llama, tmp_path, cli):
    base, adapter, merged = llama
    w = _base_tensors(base)[Q]
    bad = _tamper(merged, tmp_path / "bad", lambda t: t.__setitem__(Q, w + 2 * (t[Q] - w)))
    code, report, _ = cli("verify", base, adapter, bad, "--json")
    assert code == 1 and any(p.startswith(Q) for p in report["problems"])


def test_transposed_delta_is_caught(llama, tmp_path, cli):
    base, adapter, merged = llama
    w = _base_tensors(base)[Q]
    assert w.shape[0] == w.shape[1]  # square, so the transposed delta fits and only the numbers can tell
    bad = _tamper(merged, tmp_path / "bad", lambda t: t.__setitem__(Q, w + (t[Q] - w).T))
    code, report, _ = cli("verify", base, adapter, bad, "--json")
    assert code == 1 and any(p.startswith(Q) for p in report["problems"])


def test_rslora_scale_used_as_plain_scale_is_caught(llama, tmp_path, cli):
    base, adapter, merged = llama
    w = _base_tensors(base)[Q]
    r = 4  # plain scale α/r is the rsLoRA scale α/√r divided by √r
    bad = _tamper(merged, tmp_path / "bad", lambda t: t.__setitem__(Q, w + (t[Q] - w) / r**0.5))
    code, report, _ = cli("verify", base, adapter, bad, "--json")
    assert code == 1 and any(p.startswith(Q) for p in report["problems"])


def test_modules_to_save_head_left_at_base_is_caught(classifier, tmp_path, cli):
    base, adapter, merged = classifier
    head = _base_tensors(base)["classifier.weight"]
    bad = _tamper(merged, tmp_path / "bad", lambda t: t.__setitem__("classifier.weight", head.clone()))
    code, report, _ = cli("verify", base, adapter, bad, "--json")
    assert code == 1 and any(p.startswith("classifier.weight") for p in report["problems"])


def test_modules_to_save_head_missing_from_checkpoint_is_caught(classifier, tmp_path, cli):
    base, adapter, merged = classifier
    bad = _tamper(merged, tmp_path / "bad", lambda t: (t.pop("classifier.weight"), t.pop("classifier.bias")))
    code, report, _ = cli("verify", base, adapter, bad, "--json")
    assert code == 1
    assert any("classifier.weight" in p for p in report["problems"]), report["problems"]


def test_delta_on_the_wrong_layer_is_caught(llama, tmp_path, cli):
    base, adapter, merged = llama
    wrong = "model.layers.1.self_attn.k_proj.weight"
    w = _base_tensors(base)[Q]

    def move(t):
        delta = t[Q] - w
        t[Q] = w.clone()
        t[wrong] = t[wrong] + delta[: t[wrong].shape[0]]

    code, report, _ = cli("verify", base, adapter, _tamper(merged, tmp_path / "bad", move), "--json")
    assert code == 1
    assert any(p.startswith(wrong) for p in report["problems"]) and any(p.startswith(Q) for p in report["problems"])


@pytest.mark.skipif(not FEATURES["embedding_merge"], reason="peft 0.3 cannot merge LoRA on embeddings (refused)")
def test_plain_merge_into_a_tied_embedding_is_caught(tmp_path, cli):
    """merge_and_unload alone merges an embedding LoRA into the tensor the LM head shares, so the head changes
    too, which the unmerged model never did. The verifier must name the head."""
    from safe_merge.io import loading

    case = Case(
        "gpt2",
        SIZES,
        True,
        {"r": 4, "lora_alpha": 8, "target_modules": ["wte", "c_attn"], "fan_in_fan_out": True},
        "float32",
        seed=9,
        delta_scale=1.0,
    )
    base, adapter = materialize(case, tmp_path)
    plain = loading.load_peft(loading.load_model(base, torch.float32), adapter).merge_and_unload()
    save_model(plain, tmp_path / "plain")
    code, report, _ = cli("verify", base, adapter, tmp_path / "plain", "--json")
    assert code == 1
    assert any(p.startswith("lm_head.weight") for p in report["problems"]), report["problems"]
