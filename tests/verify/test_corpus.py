"""The defect corpus, through `safe-merge verify`: every defect fails with exit 1 naming the tensor or file, in
float32, bfloat16 and float16, on an untied Llama, a tied GPT-2 (fan_in_fan_out, an embedding LoRA) and DoRA;
every correct merge passes, whichever correct arithmetic wrote it. The weight checks must stand on their own: a
defect in the weights is named by them, not only by the output check."""

from __future__ import annotations

import inspect
import os

import peft
import pytest
from packaging.version import Version

from safe_merge import api
from tests.release import HISTORY, INSTALLED
from tests.strategies import FEATURES
from tests.verify.corpus import CORRECT, DEFECTS, DORA_DEFECTS, GPT2_DEFECTS, build

DTYPES = ("float32", "bfloat16", "float16")
ARCHS = {
    "llama": True,
    "gpt2": FEATURES["config_free_merge"] and FEATURES["embedding_merge"],
    "llama_dora": FEATURES["use_dora"],
}
# The tests session runs the whole grid; each matrix cell the bfloat16 Llama, where what differs between releases
# (the rounding facts the exact tier replays) shows.
FULL = os.environ.get("HYPOTHESIS_PROFILE", "dev") != "matrix"
GRID = [(a, d) for a, ok in ARCHS.items() if ok for d in DTYPES if FULL or (a, d) == ("llama", "bfloat16")]
# From the release the stream backend matches bit for bit, the replays know every correct PEFT path exactly.
EXACT = HISTORY.boundary("stream_backend_matches") <= Version(INSTALLED)
HAS_SAFE_MERGE = "safe_merge" in inspect.signature(peft.tuners.lora.LoraModel.merge_and_unload).parameters
# Measured misses, kept visible: each must still be missed (strict), so a fix shows up here.
KNOWN_MISSES = {
    ("llama_dora", "bfloat16", "one tensor at 1.02"): "the lean of that one bfloat16 tensor reaches z = 5.9, "
    "under the limit of 6: the smallest scale error it could show is 1.9 %, and DoRA's normalisation absorbs part "
    "of the 2 %",
}


@pytest.fixture(scope="module", params=GRID, ids=str)
def built(request, tmp_path_factory):
    arch, dtype = request.param
    return build(tmp_path_factory.mktemp(f"{arch}-{dtype}"), arch, dtype)


def _verify(built, merged) -> dict:
    return api.verify(built.base, built.adapter, merged)


@pytest.mark.parametrize("name", list(CORRECT))
def test_a_correct_merge_passes_whichever_arithmetic_wrote_it(built, tmp_path, name):
    if name == "merge_and_unload(safe_merge=True)" and not HAS_SAFE_MERGE:
        pytest.skip(f"peft {INSTALLED} has no safe_merge")
    report = _verify(built, CORRECT[name](built, tmp_path / "correct"))
    assert (report["exit_code"], report["problems"]) == (0, []), name
    weights = report["verification"]["weights"]
    if EXACT and name != "float64 delta rounded, then added":
        assert weights["tolerance_only"] == 0, weights  # a known arithmetic: every tensor exact


@pytest.mark.parametrize("name", list(DEFECTS) + list(GPT2_DEFECTS) + list(DORA_DEFECTS))
def test_each_defect_fails_with_exit_1_naming_the_tensor_or_file(built, tmp_path, name, request):
    defects = {**DEFECTS, **(GPT2_DEFECTS if built.tied else {}), **(DORA_DEFECTS if _dora(built) else {})}
    if name not in defects:
        pytest.skip("not a defect this case can have")
    miss = KNOWN_MISSES.get((built.arch, str(built.dtype).removeprefix("torch."), name))
    if miss:
        request.applymarker(pytest.mark.xfail(reason=miss, strict=True))
    merged, named = defects[name](built, tmp_path / "bad")
    report = _verify(built, merged)
    assert report["exit_code"] == 1, (name, report["verification"]["weights"]["systematic"])
    weight_problems = [p for p in report["problems"] if not p.startswith("outputs differ")]
    assert weight_problems, f"{name}: only the output check saw it: {report['problems']}"
    assert any(named in p for p in weight_problems), (name, named, report["problems"])


def _dora(built) -> bool:
    return any(lora.magnitude is not None for lora in built.loras.values())
