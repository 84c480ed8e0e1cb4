"""The defect corpus, through `safe-merge verify`: every defect fails with exit 1 naming the tensor or file, in
float32, bfloat16 and float16, on an untied Llama, a tied GPT-2 (fan_in_fan_out, an embedding LoRA) and DoRA;
every correct merge passes, whichever correct arithmetic wrote it. The weight checks must stand on their own: a
defect in the weights is named by them, not only by the output check."""

from __future__ import annotations

import pytest

from safe_merge import api
from tests.verify.corpus import CORRECT, DEFECTS, DORA_DEFECTS, GPT2_DEFECTS, build

DTYPES = ("float32", "bfloat16", "float16")
# Measured misses, kept visible: each must still be missed (strict), so a fix shows up here.
KNOWN_MISSES = {
    ("llama_dora", "bfloat16", "one tensor at 1.02"): "DoRA is not replayed exactly; the lean of one bfloat16 "
    "tensor among six reaches z = 5.9, under the limit of 6",
}


@pytest.fixture(scope="module", params=[(a, d) for a in ("llama", "gpt2", "llama_dora") for d in DTYPES], ids=str)
def built(request, tmp_path_factory):
    arch, dtype = request.param
    return build(tmp_path_factory.mktemp(f"{arch}-{dtype}"), arch, dtype)


def _verify(built, merged) -> dict:
    return api.verify(built.base, built.adapter, merged)


@pytest.mark.parametrize("name", list(CORRECT))
def test_a_correct_merge_passes_whichever_arithmetic_wrote_it(built, tmp_path, name):
    report = _verify(built, CORRECT[name](built, tmp_path / "correct"))
    assert (report["exit_code"], report["problems"]) == (0, []), name
    weights = report["verification"]["weights"]
    if name != "float64 delta rounded, then added" and not _dora(built):
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
