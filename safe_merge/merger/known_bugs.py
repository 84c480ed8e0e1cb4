"""Merges that a PEFT release is known to get wrong, or to crash on, refused before any work with the release
that fixed them. The windows are data (history.json boundaries), found by running the matrix."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from packaging.version import Version

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.history import History
from safe_merge.compat.keys import Role, parse_key
from safe_merge.compat.scaling import scaling
from safe_merge.errors import BadInput
from safe_merge.merger.combination import SAME_RANK, SVD, Combination


def refuse_known_bugs(adapter: AdapterFiles, release: str, dtype: torch.dtype, model_type: str | None = None) -> None:
    """One adapter's merge in this release (``model_type``: the base config's, where known)."""
    history = History.load()
    roles: dict[str, set[Role]] = {}
    for key in adapter.tensors:
        parsed = parse_key(key)
        if parsed is not None and parsed.module:
            roles.setdefault(parsed.module, set()).add(parsed.role)
    if model_type == "gpt2" and history.affected("merge_refuses_gpt2", release):
        _refuse(adapter, release, "merge_refuses_gpt2", "cannot merge into GPT-2 models", key=None)
    embeddings = sorted(m for m, r in roles.items() if Role.EMBEDDING_A in r)
    if embeddings and history.affected("merge_embedding_lora_crashes", release):
        _refuse(
            adapter,
            release,
            "merge_embedding_lora_crashes",
            f"cannot merge LoRA on embeddings ({embeddings[0]})",
            key=None,
        )
    biased = sorted(m for m, r in roles.items() if Role.LORA_B_BIAS in r)
    if biased and history.affected("lora_bias_merge_unscaled", release):
        for module in biased:
            a_key = next(k for k in adapter.tensors if _module(k) == module and _role(k) is Role.LORA_A)
            scale = scaling(adapter.config, module, int(adapter.tensors[a_key].shape[0]))
            if abs(scale - 1.0) > 1e-12:
                fixed = history.boundaries["lora_bias_merge_unscaled"]["until"]
                raise BadInput(
                    f"the installed PEFT {release} merges lora_bias without the module's scale ({module} has scale "
                    f"{scale:.4g}); fixed in {fixed}",
                    path=adapter.weight_file,
                    key="lora_bias",
                    hint=f"install peft>={fixed}",
                )
    dora = sorted(m for m, r in roles.items() if Role.MAGNITUDE in r)
    if not dora:
        return
    if adapter.config.get("fan_in_fan_out") and history.affected("dora_fan_in_fan_out_crashes", release):
        _refuse(
            adapter, release, "dora_fan_in_fan_out_crashes", f"cannot load DoRA on fan_in_fan_out layers ({dora[0]})"
        )
    embeddings = [m for m in dora if Role.EMBEDDING_A in roles[m]]
    if embeddings and history.affected("dora_embedding_merge_wrong", release):
        _refuse(adapter, release, "dora_embedding_merge_wrong", f"merges DoRA on embeddings wrongly ({embeddings[0]})")
    if dtype in (torch.bfloat16, torch.float16) and history.affected("dora_half_precision_merge_raises", release):
        what = f"cannot merge DoRA into a {str(dtype).removeprefix('torch.')} model ({dora[0]})"
        _refuse(adapter, release, "dora_half_precision_merge_raises", what, "or merge with --dtype float32")


def refuse_combination_bugs(combination: Combination, adapters: Sequence[AdapterFiles], release: str) -> None:
    """Releases whose add_weighted_adapter is known to compute something else than the type means."""
    history = History.load()
    kind = combination.effective_type(len(adapters))
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
    if kind.startswith("dare") and combination.density < 1 and history.affected("dare_rescale_missing", release):
        fixed = history.boundaries["dare_rescale_missing"]["until"]
        raise BadInput(
            f"{kind} in the installed PEFT {release} drops DARE's 1/density rescale of the kept entries; "
            f"fixed in {fixed}",
            hint=f"install peft>={fixed}, or use ties / magnitude_prune",
        )
    first = adapters[0].config
    if history.affected("combined_adapter_inherits_patterns", release) and (
        first.get("rank_pattern") or first.get("alpha_pattern")
    ):
        fixed = history.boundaries["combined_adapter_inherits_patterns"]["until"]
        raise BadInput(
            f"the installed PEFT {release} gives the combined adapter the first adapter's rank_pattern / "
            f"alpha_pattern, which changes its ranks and scales; fixed in {fixed}",
            path=adapters[0].path / "adapter_config.json",
            key="rank_pattern" if first.get("rank_pattern") else "alpha_pattern",
            hint=f"install peft>={fixed}, or put an adapter without patterns first",
        )
    if len(adapters) > 1 and history.affected("combination_needs_same_targets", release):
        modules = [{_module(k) for k in a.tensors if _role(k) in (Role.LORA_A, Role.EMBEDDING_A)} for a in adapters]
        for adapter, own in zip(adapters[1:], modules[1:], strict=True):
            if own != modules[0]:
                fixed = history.boundaries["combination_needs_same_targets"]["until"]
                which = sorted(own ^ modules[0])[0]
                raise BadInput(
                    f"the installed PEFT {release} can only combine adapters that target the same modules "
                    f"({adapters[0].path.name} and {adapter.path.name} differ at {which}); fixed in {fixed}",
                    path=adapter.path / "adapter_config.json",
                    key="target_modules",
                    hint=f"install peft>={fixed}",
                )
    if kind == "cat" and history.affected("cat_rank_pattern_overflow", release):
        for adapter in adapters:
            config = adapter.config
            larger = {m: r for m, r in (config.get("rank_pattern") or {}).items() if r > config.get("r", 8)}
            if larger:
                fixed = history.boundaries["cat_rank_pattern_overflow"]["until"]
                module, rank = next(iter(larger.items()))
                raise BadInput(
                    f"cat in the installed PEFT {release} sizes the combined adapter by each adapter's r and cannot "
                    f"hold rank_pattern {module!r}: {rank} (r = {config.get('r', 8)}); fixed in {fixed}",
                    path=adapter.path / "adapter_config.json",
                    key="rank_pattern",
                    hint=f"install peft>={fixed}",
                )
    if kind in SVD and history.affected("svd_combination_clamps", release):
        fixed = history.boundaries["svd_combination_clamps"]["until"]
        raise BadInput(
            f"{kind} in the installed PEFT {release} clamps the combined factors to their 0.99 quantile, so the "
            f"result is not the rank-k cut of the weighted sum; optional (and off) from {fixed}",
            hint=f"install peft>={fixed}, or use --combination linear",
        )
    if kind in SVD and history.affected("svd_combination_embedding_crashes", release):
        for adapter in adapters:
            embedding = next((k for k in adapter.tensors if _role(k) is Role.EMBEDDING_A), None)
            if embedding is not None:
                fixed = history.boundaries["svd_combination_embedding_crashes"]["until"]
                raise BadInput(
                    f"{kind} in the installed PEFT {release} cannot combine adapters on embeddings ({embedding}); "
                    f"fixed in {fixed}",
                    path=adapter.weight_file,
                    key=embedding,
                    hint=f"install peft>={fixed}, or use --combination cat (exact)",
                )
    if kind not in SVD or not history.affected("svd_combination_scale_twice", release):
        return
    window = history.boundaries["svd_combination_scale_twice"]
    for adapter in adapters:
        for key, tensor in adapter.tensors.items():
            parsed = parse_key(key)
            if parsed is not None and parsed.role in (Role.LORA_A, Role.EMBEDDING_A):
                scale = scaling(adapter.config, parsed.module, int(tensor.shape[0]))
                if abs(scale - 1.0) > 1e-12:
                    raise BadInput(
                        f"{kind} in the installed PEFT {release} applies each adapter's scale twice ({parsed.module} "
                        f"has scale {scale:.4g}); fixed in {window['until']}",
                        path=adapter.path / "adapter_config.json",
                        key="lora_alpha",
                        hint=f"install peft>={window['until']}, or use --combination cat (exact)",
                    )


def _role(key: str) -> Role | None:
    parsed = parse_key(key)
    return parsed.role if parsed is not None else None


def _module(key: str) -> str | None:
    parsed = parse_key(key)
    return parsed.module if parsed is not None else None


def _refuse(
    adapter: AdapterFiles, release: str, bug: str, what: str, alternative: str = "", key: str | None = "use_dora"
) -> None:
    fixed = History.load().boundaries[bug]["until"]
    raise BadInput(
        f"the installed PEFT {release} {what}; fixed in {fixed}",
        path=adapter.weight_file,
        key=key,
        hint=f"install peft>={fixed}" + (f", {alternative}" if alternative else ""),
    )
