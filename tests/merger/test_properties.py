"""Property tests: for drawn tiny models and LoRA configs, in float32, bfloat16 and float16, the merged model
answers like the unmerged PeftModel, the verifier passes, and the saved model reloads to the same answers; where
the stream backend takes the merge, its output equals the PEFT backend's bit for bit."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from safe_merge.io import loading
from safe_merge.io.checkpoint import Checkpoint
from safe_merge.merger.pipeline import MergeRequest, merge_command
from safe_merge.report import summarize
from safe_merge.verifier.outputs import check_outputs
from safe_merge.verifier.probes import probe_inputs
from tests import stats
from tests.helpers import materialize, merge_in_memory, probe_ids
from tests.release import HISTORY, INSTALLED
from tests.strategies import DTYPES, FEATURES, Case, build_base, cases

_NO_GPT2 = pytest.mark.skipif(
    not FEATURES["config_free_merge"], reason=f"peft {INSTALLED} cannot merge GPT-2 (refused)"
)
HF_ARCHS = ("llama", pytest.param("gpt2", marks=_NO_GPT2), "bert_cls", "opt")
pytestmark = pytest.mark.property


def _merge_hf(case: Case, root: Path, dtype: str, backend: str = "auto") -> tuple[dict, Path, Path, Path]:
    base_dir, adapter_dir = root / "base", root / "adapter"
    if not base_dir.exists():
        materialize(case, root)
    out = root / f"merged-{dtype}-{backend}"
    report = merge_command(MergeRequest(str(base_dir), [str(adapter_dir)], out, dtype=dtype, backend=backend))
    return report, base_dir, adapter_dir, out


def _assert_bit_identical(stream_out: Path, peft_out: Path, dtype: str) -> None:
    """The stream backend's output equals the PEFT backend's tensor by tensor, bit for bit."""
    streamed, merged = Checkpoint(stream_out), Checkpoint(peft_out)
    assert streamed.tensors.keys() == merged.tensors.keys(), sorted(set(streamed.tensors) ^ set(merged.tensors))
    for name in streamed.tensors:
        a, b = streamed.read(name), merged.read(name)
        assert a.dtype == b.dtype and a.shape == b.shape, f"{dtype}: {name} {a.dtype}{tuple(a.shape)} vs {b.dtype}"
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{dtype}: {name} differs from the PEFT backend"
    stats.count_bit_identical(len(streamed.tensors))


def _reload_check(base_dir: Path, adapter_dir: Path, out: Path, dtype: torch.dtype):
    """Independently of the verifier: reload OUT with the base's class and compare with a fresh PeftModel."""
    config = loading.read_model_config(out)
    merged = loading.load_model(out, dtype)
    assert type(merged) is loading.model_class(loading.read_model_config(base_dir))
    reference = loading.load_peft(loading.load_model(base_dir, dtype), adapter_dir)
    return check_outputs(reference, merged, probe_inputs(config), dtype)


def _reference_overflowed(report: dict) -> bool:
    """Large drawn deltas can overflow float16 in the unmerged model itself. Then the verdict must be 'could not
    verify' (never a pass) and the weight check must still have passed."""
    outputs = report["verification"]["outputs"]
    if outputs["ran"] or "overflow" not in outputs.get("reason", ""):
        return False
    assert report["status"] == "could_not_verify", report["status"]
    assert report["verification"]["weights"]["passed"], report["problems"]
    stats.count_overflow()
    return True


def _assert_checks_can_fail(report: dict, dtype: str) -> None:
    """The drawn adapter is strong enough that a merge which did nothing would have failed: every merged tensor
    moves by more than its tolerance, and in float32 the outputs move by more than theirs."""
    weights = report["verification"]["weights"]
    assert not weights["unresolvable"], f"{dtype}: deltas below the dtype's resolution: {weights['unresolvable']}"
    outputs = report["verification"]["outputs"]
    # releases whose disable_adapter leaves saved modules on measure the effect without them (reported as such)
    understated = HISTORY.affected("disable_adapter_keeps_saved_modules", INSTALLED) and report["ledger"]["replaced"]
    if dtype == "float32" and not understated:
        assert outputs["discriminating"], f"the adapter does not move float32 outputs: {outputs}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", HF_ARCHS)
@given(data=st.data())
def test_merged_model_answers_like_unmerged_peft_model_in_every_dtype(arch, data):
    case = data.draw(cases(arch=arch, dtype="float32"), label="case")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for dtype in DTYPES:
            report, base_dir, adapter_dir, out = _merge_hf(case, root, dtype)
            if _reference_overflowed(report):
                continue  # nothing to compare, and nothing written; the weights were still checked
            assert report["status"] == "passed", f"{dtype}\n" + summarize("merge", report)
            stats.record(dtype, arch, report)
            _assert_checks_can_fail(report, dtype)
            if report["backend"] == "stream":  # auto chose it: the PEFT backend must give the same bits
                by_peft, *_, peft_out = _merge_hf(case, root, dtype, backend="peft")
                assert by_peft["status"] == "passed", f"{dtype}\n" + summarize("merge", by_peft)
                _assert_bit_identical(out, peft_out, dtype)
            again = _reload_check(base_dir, adapter_dir, out, DTYPES[dtype])
            assert again.passed, f"{dtype}: reloaded merged model off by {again.max_abs:.3g} > {again.tol:.3g}"


@pytest.mark.skipif(not FEATURES["config_free_merge"], reason=f"peft {INSTALLED} merges only models with a config")
@given(case=cases(arch="custom", dtype="float32"))
def test_custom_torch_model_merges_like_unmerged_in_every_dtype(case):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, dtype in DTYPES.items():
            result, merged = merge_in_memory(case, root, dtype)
            report = result.report()
            if _reference_overflowed(report):
                continue
            assert result.status == "passed", f"{name}: {report['problems']} {report['gaps']}"
            stats.record(name, "custom", report)
            _assert_checks_can_fail(report, name)
            # the saved weights reload into a fresh model and answer the same
            save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(root / f"{name}.safetensors"))
            fresh = build_base(case).to(dtype)
            fresh.load_state_dict(load_file(str(root / f"{name}.safetensors")))
            with torch.no_grad():
                assert torch.equal(fresh(probe_ids(case)), merged(probe_ids(case)))


@pytest.mark.parametrize("arch", HF_ARCHS)
@given(data=st.data())
def test_merge_with_zero_lora_b_equals_the_base(arch, data):
    case = data.draw(cases(arch=arch, dtype="float32", zero_b=True), label="case")
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report, base_dir, _, out = _merge_hf(case, root, dtype)
        assert report["status"] == "passed", summarize("merge", report)
        base = loading.load_model(base_dir, DTYPES[dtype]).state_dict()
        merged = loading.load_model(out, DTYPES[dtype]).state_dict()
        assert base.keys() == merged.keys()
        changed = [k for k in base if not torch.equal(base[k], merged[k])]
        assert not changed, f"a zero adapter changed {changed}"  # bit for bit, against the base in the same dtype
