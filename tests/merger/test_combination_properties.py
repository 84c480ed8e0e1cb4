"""Property test: for drawn tiny models, two or three drawn adapters, a drawn combination type and drawn weights,
`merge` passes every check (the combined adapter against what the type means, the merged weights, the outputs
against the PeftModel with the combined adapter active) in every dtype."""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

from safe_merge.compat.adapter_files import load_adapter
from safe_merge.compat.history import History
from safe_merge.compat.keys import targeted_modules
from safe_merge.io import loading
from safe_merge.merger.pipeline import MergeRequest, merge_command
from safe_merge.report import summarize
from safe_merge.verifier.combination_types import (
    NEEDS_DENSITY,
    SAME_RANK,
    SVD,
    UNCHECKABLE,
    parse_combination,
    svd_rank,
)
from tests import stats
from tests.helpers import save_adapter, save_model
from tests.strategies import ARCHS, DTYPES, Case, build_base, lora_kwargs, sizes_for

HISTORY = History.load()
INSTALLED = Version(loading.installed_peft())


def _refused_here(t: str) -> bool:
    """Types whose code in the installed release is known wrong are refused (tested in test_several_adapters)."""
    return (
        (t.startswith("dare") and HISTORY.affected("dare_rescale_missing", INSTALLED))
        or (t in SVD and HISTORY.affected("svd_combination_scale_twice", INSTALLED))
        or (t in SVD and HISTORY.affected("svd_combination_clamps", INSTALLED))
    )


TYPES = sorted(
    t
    for t in HISTORY.combination_types
    if HISTORY.combination_first(t) <= INSTALLED and t not in UNCHECKABLE and not _refused_here(t)
)
ARCH_NAMES = ("llama", "gpt2", "opt")  # bert_cls saves its classifier head, which no combination can weight
pytestmark = pytest.mark.property


@st.composite
def several(draw):
    arch = draw(st.sampled_from(ARCH_NAMES))
    sizes = draw(sizes_for(arch))
    tied = ARCHS[arch].tied == "always" or (ARCHS[arch].tied == "maybe" and draw(st.booleans()))
    combination = draw(st.sampled_from(TYPES))
    n = draw(st.integers(2, 3))
    loras = []
    for _ in range(n):
        kw = draw(lora_kwargs(ARCHS[arch], sizes, plain=True))
        kw.pop("layers_to_transform", None)  # the combined adapter takes the first adapter's selection
        if combination in SAME_RANK:
            kw.pop("rank_pattern", None)
            kw.pop("alpha_pattern", None)
            kw["r"] = loras[0]["r"] if loras else kw["r"]
        if not loras and HISTORY.affected("combined_adapter_inherits_patterns", INSTALLED):
            kw.pop("rank_pattern", None)  # refused there when the first adapter has them (test_several_adapters)
            kw.pop("alpha_pattern", None)
        if loras and HISTORY.affected("combination_needs_same_targets", INSTALLED):
            kw["target_modules"] = loras[0]["target_modules"]  # refused there otherwise (test_known_bugs)
        if combination == "cat" and HISTORY.affected("cat_rank_pattern_overflow", INSTALLED):
            kw.pop("rank_pattern", None)  # refused there (test_known_bugs)
        if combination in SVD and HISTORY.affected("svd_combination_embedding_crashes", INSTALLED):
            plain = [t.name for t in ARCHS[arch].targets if t.kind != "embedding"]  # refused there (test_known_bugs)
            kw["target_modules"] = [t for t in kw["target_modules"] if t in plain] or plain[:1]
        loras.append(kw)
    weights = draw(st.lists(st.sampled_from([-1.2, -0.5, 0.3, 0.7, 1.0, 1.5]), min_size=n, max_size=n))
    if combination in SAME_RANK and INSTALLED < HISTORY.boundary("negative_combination_weights"):
        weights = [abs(w) for w in weights]  # refused there (tested in test_several_adapters)
    density = draw(st.sampled_from([0.3, 0.5, 0.8, 1.0])) if combination in NEEDS_DENSITY else None
    seed = draw(st.integers(0, 2**16))
    cases = [Case(arch, sizes, tied, kw, "float32", seed + i) for i, kw in enumerate(loras)]
    return cases, parse_combination(combination, weights, n, density)


@pytest.mark.slow
@pytest.mark.skipif(not TYPES, reason=f"peft {INSTALLED} has no combination type this suite can check")
@settings(max_examples=max(3, settings.default.max_examples // 2))  # each example is 3 merges
@given(drawn=several())
def test_a_combination_of_drawn_adapters_passes_every_check_in_every_dtype(drawn):
    cases, combination = drawn
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_base(cases[0])
        save_model(base, root / "base")
        adapters = []
        for i, case in enumerate(cases):
            save_adapter(case, base, root / f"a{i}")
            adapters.append(str(root / f"a{i}"))
        combination = _fit_svd_rank(combination, base, adapters)
        for dtype in DTYPES:
            request = MergeRequest(str(root / "base"), adapters, root / f"out-{dtype}", dtype, combination=combination)
            report = merge_command(request)
            outputs = report["verification"]["outputs"]
            if not outputs["ran"] and "overflow" in outputs.get("reason", ""):
                assert report["verification"]["weights"]["passed"], report["problems"]
                continue  # a float16 reference that overflows is 'could not verify', never a pass
            assert report["status"] == "passed", f"{dtype}\n" + summarize("merge", report)
            assert report["verification"]["combination"]["modules_checked"] > 0
            stats.record_combination(report)


def _fit_svd_rank(combination, base, adapters: list[str]):
    """An *svd cut larger than a targeted module is refused (tested elsewhere); draw within what fits."""
    if combination.type not in SVD:
        return combination
    files = [load_adapter(Path(a)) for a in adapters]
    shapes = {name: tuple(t.shape) for name, t in base.state_dict().items()}  # a tied head is not in the file
    modules = targeted_modules(k for f in files for k in f.tensors)
    fits = min(min(shapes[f"{m}.weight"][0], math.prod(shapes[f"{m}.weight"][1:])) for m in modules)
    if svd_rank(combination, [f.config for f in files]) <= fits:
        return combination
    return replace(combination, svd_rank=fits)
