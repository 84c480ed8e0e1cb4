"""Merges that a PEFT release is known to get wrong, or to crash on, refused before any work with the release
that fixed them. The windows are data (history.json boundaries), found by running the matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch
from packaging.version import Version

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.history import History
from safe_merge.compat.keys import Role, parse_key
from safe_merge.compat.scaling import scaling
from safe_merge.errors import BadInput
from safe_merge.verifier.combination_types import SAME_RANK, SVD, Combination

EXACT_INSTEAD = "or use --combination cat (exact)"


def _refuse(
    bug: str, release: str, what: str, *, path: Path | None = None, key: str | None = None, alternative: str = ""
) -> NoReturn:
    """The installed release is in the bug's window: say what it does wrong and which release fixed it."""
    fixed = History.load().boundaries[bug]["until"]
    raise BadInput(
        f"the installed PEFT {release} {what}; fixed in {fixed}",
        path=path,
        key=key,
        hint=f"install peft>={fixed}" + (f", {alternative}" if alternative else ""),
    )


def _parsed(key: str) -> tuple[str | None, Role | None]:
    parsed = parse_key(key)
    return (parsed.module, parsed.role) if parsed is not None else (None, None)


def _scale(adapter: AdapterFiles, module: str) -> float:
    """A module's scale, its rank read from its A factor."""
    a = next(t for k, t in adapter.tensors.items() if _parsed(k) in ((module, Role.LORA_A), (module, Role.EMBEDDING_A)))
    return scaling(adapter.config, module, int(a.shape[0]))


def refuse_known_bugs(adapter: AdapterFiles, release: str, dtype: torch.dtype, model_type: str | None = None) -> None:
    """One adapter's merge in this release (``model_type``: the base config's, where known)."""
    history = History.load()
    roles: dict[str, set[Role]] = {}
    for key in adapter.tensors:
        module, role = _parsed(key)
        if module:
            roles.setdefault(module, set()).add(role)
    weights = adapter.weight_file
    if model_type == "gpt2" and history.affected("merge_refuses_gpt2", release):
        _refuse("merge_refuses_gpt2", release, "cannot merge into GPT-2 models", path=weights)
    embeddings = sorted(m for m, r in roles.items() if Role.EMBEDDING_A in r)
    if embeddings and history.affected("merge_embedding_lora_crashes", release):
        what = f"cannot merge LoRA on embeddings ({embeddings[0]})"
        _refuse("merge_embedding_lora_crashes", release, what, path=weights)
    if history.affected("lora_bias_merge_unscaled", release):
        for module in sorted(m for m, r in roles.items() if Role.LORA_B_BIAS in r):
            scale = _scale(adapter, module)
            if abs(scale - 1.0) > 1e-12:
                what = f"merges lora_bias without the module's scale ({module} has scale {scale:.4g})"
                _refuse("lora_bias_merge_unscaled", release, what, path=weights, key="lora_bias")
    dora = sorted(m for m, r in roles.items() if Role.MAGNITUDE in r)
    if not dora:
        return
    if adapter.config.get("fan_in_fan_out") and history.affected("dora_fan_in_fan_out_crashes", release):
        what = f"cannot load DoRA on fan_in_fan_out layers ({dora[0]})"
        _refuse("dora_fan_in_fan_out_crashes", release, what, path=weights, key="use_dora")
    dora_embeddings = [m for m in dora if Role.EMBEDDING_A in roles[m]]
    if dora_embeddings and history.affected("dora_embedding_merge_wrong", release):
        what = f"merges DoRA on embeddings wrongly ({dora_embeddings[0]})"
        _refuse("dora_embedding_merge_wrong", release, what, path=weights, key="use_dora")
    if dtype in (torch.bfloat16, torch.float16) and history.affected("dora_half_precision_merge_raises", release):
        what = f"cannot merge DoRA into a {str(dtype).removeprefix('torch.')} model ({dora[0]})"
        alternative = "or merge with --dtype float32"
        _refuse(
            "dora_half_precision_merge_raises", release, what, path=weights, key="use_dora", alternative=alternative
        )


def refuse_combination_bugs(combination: Combination, adapters: Sequence[AdapterFiles], release: str) -> None:
    """Releases whose add_weighted_adapter is known to compute something else than the type means: each known bug
    of COMBINATION_BUGS, in order."""
    kind = combination.effective_type(len(adapters))
    for bug in COMBINATION_BUGS:
        bug(combination, kind, adapters, release)


def _targets(adapter: AdapterFiles) -> set[str]:
    return {m for m, r in map(_parsed, adapter.tensors) if r in (Role.LORA_A, Role.EMBEDDING_A)}


def _negative_weights(combination: Combination, kind: str, adapters: Sequence[AdapterFiles], release: str) -> None:
    history = History.load()
    negative = history.boundary("negative_combination_weights")
    signed_on_a = history.affected("linear_weight_on_a_only", release)  # w·s goes on A whole: the sign survives
    if (
        kind in SAME_RANK
        and Version(release) < negative
        and not signed_on_a
        and any(w < 0 for w in combination.weights)
    ):
        raise BadInput(
            f"{kind} with a negative weight needs PEFT {negative} or newer (the installed {release} loses the "
            "sign: it takes the square root of each weight for both factors)",
            hint=f"install peft>={negative}, or use --combination cat / svd, which take negative weights",
        )


def _dare_rescale(combination: Combination, kind: str, adapters: Sequence[AdapterFiles], release: str) -> None:
    if kind.startswith("dare") and combination.density < 1 and History.load().affected("dare_rescale_missing", release):
        what = f"drops DARE's 1/density rescale of the kept entries ({kind})"
        _refuse("dare_rescale_missing", release, what, alternative="or use ties / magnitude_prune")


def _inherited_patterns(combination: Combination, kind: str, adapters: Sequence[AdapterFiles], release: str) -> None:
    first = adapters[0].config
    if History.load().affected("combined_adapter_inherits_patterns", release) and (
        first.get("rank_pattern") or first.get("alpha_pattern")
    ):
        what = (
            "gives the combined adapter the first adapter's rank_pattern / alpha_pattern, which changes its ranks "
            "and scales"
        )
        key = "rank_pattern" if first.get("rank_pattern") else "alpha_pattern"
        path = adapters[0].path / "adapter_config.json"
        alternative = "or put an adapter without patterns first"
        _refuse("combined_adapter_inherits_patterns", release, what, path=path, key=key, alternative=alternative)


def _different_targets(combination: Combination, kind: str, adapters: Sequence[AdapterFiles], release: str) -> None:
    if len(adapters) < 2 or not History.load().affected("combination_needs_same_targets", release):
        return
    targets = [_targets(a) for a in adapters]
    for adapter, own in zip(adapters[1:], targets[1:], strict=True):
        if own != targets[0]:
            what = (
                f"can only combine adapters that target the same modules ({adapters[0].path.name} and "
                f"{adapter.path.name} differ at {sorted(own ^ targets[0])[0]})"
            )
            path = adapter.path / "adapter_config.json"
            _refuse("combination_needs_same_targets", release, what, path=path, key="target_modules")


def _cat_rank_overflow(combination: Combination, kind: str, adapters: Sequence[AdapterFiles], release: str) -> None:
    if kind != "cat" or not History.load().affected("cat_rank_pattern_overflow", release):
        return
    for adapter in adapters:
        r = adapter.config.get("r", 8)
        larger = {m: k for m, k in (adapter.config.get("rank_pattern") or {}).items() if k > r}
        if larger:
            module, rank = next(iter(larger.items()))
            what = f"sizes a cat-combined adapter by each r and cannot hold rank_pattern {module!r}: {rank} (r = {r})"
            path = adapter.path / "adapter_config.json"
            _refuse("cat_rank_pattern_overflow", release, what, path=path, key="rank_pattern")


def _svd_clamps(combination: Combination, kind: str, adapters: Sequence[AdapterFiles], release: str) -> None:
    if kind in SVD and History.load().affected("svd_combination_clamps", release):
        what = f"clamps the {kind}-combined factors to their 0.99 quantile, not the rank-k cut of the weighted sum"
        _refuse("svd_combination_clamps", release, what, alternative="or use --combination linear")


def _svd_embeddings(combination: Combination, kind: str, adapters: Sequence[AdapterFiles], release: str) -> None:
    if kind not in SVD or not History.load().affected("svd_combination_embedding_crashes", release):
        return
    for adapter in adapters:
        embedding = next((k for k in adapter.tensors if _parsed(k)[1] is Role.EMBEDDING_A), None)
        if embedding is not None:
            what = f"cannot combine adapters on embeddings with {kind} ({embedding})"
            path = adapter.weight_file
            bug = "svd_combination_embedding_crashes"
            _refuse(bug, release, what, path=path, key=embedding, alternative=EXACT_INSTEAD)


def _svd_scale_twice(combination: Combination, kind: str, adapters: Sequence[AdapterFiles], release: str) -> None:
    if kind not in SVD or not History.load().affected("svd_combination_scale_twice", release):
        return
    for adapter in adapters:
        for module in sorted(_targets(adapter)):
            scale = _scale(adapter, module)
            if abs(scale - 1.0) > 1e-12:
                what = f"applies each adapter's scale twice in {kind} ({module} has scale {scale:.4g})"
                path = adapter.path / "adapter_config.json"
                bug = "svd_combination_scale_twice"
                _refuse(bug, release, what, path=path, key="lora_alpha", alternative=EXACT_INSTEAD)


# Each takes (combination, its effective type, the adapters, the installed release) and refuses or returns.
COMBINATION_BUGS = (
    _negative_weights,
    _dare_rescale,
    _inherited_patterns,
    _different_targets,
    _cat_rank_overflow,
    _svd_clamps,
    _svd_embeddings,
    _svd_scale_twice,
)
