"""Several adapters into one: every reason to refuse a combination before any model is loaded (a type the
installed PEFT lacks, ranks or layer selections a type cannot join, adapter parts that a weighted combination has
no meaning for, adapters from different bases)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath

import torch
from packaging.version import Version

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.history import History
from safe_merge.compat.keys import LORA_ROLES, Role, parse_key, targeted_modules
from safe_merge.errors import BadInput, Unsupported
from safe_merge.io import loading
from safe_merge.verifier.combination_types import SAME_RANK, SVD, UNCHECKABLE, Combination, svd_rank

# The combined adapter takes these from the first adapter; if the others differ, their modules may be dropped.
INHERITED_SELECTION = ("layers_to_transform", "layers_pattern", "exclude_modules")
_FEATURE = {
    Role.MAGNITUDE: "a DoRA magnitude vector",
    Role.LORA_B_BIAS: "a lora_B bias (lora_bias=True)",
    Role.PARAM: "a saved copy of a base parameter (modules_to_save or bias)",
    Role.BASE_LAYER_PARAM: "a saved copy of a base parameter (bias or a saved embedding)",
    Role.ORIGINAL_COPY: "a saved module (modules_to_save)",
    Role.TOKEN_DELTA: "trainable tokens",
}


_COPIES = frozenset({Role.PARAM, Role.BASE_LAYER_PARAM, Role.ORIGINAL_COPY})


def refuse_uncombinable(
    combination: Combination, adapters: Sequence[AdapterFiles], release: str, base_dir: Path
) -> None:
    """Everything that makes this combination impossible or meaningless, found from configs, tensor shapes and
    (for saved copies of base parameters) the base's stored tensors."""
    kind = combination.effective_type(len(adapters))
    first = History.load().combination_first(combination.type)
    if first is None or Version(release) < first:
        raise BadInput(
            f"combination {combination.type} is not in the installed PEFT {release}; it arrived in {first}",
            hint=f"install peft>={first}, or pick a type this release has",
        )
    if len(adapters) > 1 and combination.type in UNCHECKABLE:
        raise Unsupported(
            f"{combination.type} prunes the adapters' deltas at random and then cuts them by SVD: the result "
            "cannot be checked against the adapters, and safe-merge publishes only what it verified\n"
            f"  what to do: use {combination.type.removesuffix('_svd')} (its random masks are checked entry by "
            "entry) or a deterministic *svd type"
        )
    for adapter in adapters:
        _refuse_parts(adapter, base_dir)
    _refuse_different_bases(adapters)
    _refuse_different_selection(adapters)
    if len(adapters) > 1 and kind in SAME_RANK:
        _refuse_rank_mismatch(kind, adapters)
    if len(adapters) > 1 and kind in SVD:
        _refuse_rank_beyond_modules(combination, adapters, base_dir)


def _refuse_parts(adapter: AdapterFiles, base_dir: Path) -> None:
    """Only the low-rank factors can be weighted and joined; anything else would be dropped or doubled. A saved
    copy that equals the base (PEFT saves embedding weights beside embedding LoRAs) changes nothing: allowed.
    A copy of a parameter the base file does not hold (a tied head) waits for refuse_changed_copies."""
    for key, tensor in adapter.tensors.items():
        parsed = parse_key(key)
        if parsed is None or parsed.role in LORA_ROLES:
            continue
        if parsed.role in _COPIES:
            stored = loading.stored_tensor(base_dir, parsed.param) if parsed.param else None
            if stored is None or _same(stored, tensor):
                continue
        _refuse_part(adapter, key, parsed.role)
    if adapter.config.get("target_parameters"):
        raise BadInput(
            "adapters on nn.Parameter targets cannot be combined",
            path=adapter.path / "adapter_config.json",
            key="target_parameters",
            hint="merge this adapter on its own",
        )


def refuse_changed_copies(adapters: Sequence[AdapterFiles], base_params: Mapping[str, torch.Tensor]) -> None:
    """Once the base is loaded: every saved copy of a base parameter must equal it."""
    for adapter in adapters:
        for key, tensor in adapter.tensors.items():
            parsed = parse_key(key)
            if parsed is not None and parsed.role in _COPIES:
                base = base_params.get(parsed.param)
                if base is None or not _same(base, tensor):
                    _refuse_part(adapter, key, parsed.role)


def _same(base: torch.Tensor, copy: torch.Tensor) -> bool:
    return base.shape == copy.shape and torch.equal(base, copy.to(base.dtype))


def _refuse_part(adapter: AdapterFiles, key: str, role: Role) -> None:
    raise BadInput(
        f"the adapter holds {_FEATURE.get(role, role.value)}, which add_weighted_adapter cannot combine (it "
        "would be dropped or taken from one adapter only)",
        path=adapter.weight_file,
        key=key,
        hint="merge this adapter on its own, then merge the others into that model",
    )


def _base_name(adapter: AdapterFiles) -> str | None:
    name = adapter.config.get("base_model_name_or_path")
    return PurePath(str(name).rstrip("/")).name.lower() if name else None


def _refuse_different_bases(adapters: Sequence[AdapterFiles]) -> None:
    """A hub id and a local copy of it share their last path part; different models do not."""
    named = [(a, _base_name(a)) for a in adapters if _base_name(a)]
    names = {n for _, n in named}
    if len(names) > 1:
        listing = "; ".join(f"{a.path}: {a.config.get('base_model_name_or_path')}" for a, _ in named)
        raise BadInput(
            f"the adapters were trained on different base models ({listing})",
            key="base_model_name_or_path",
            hint="combine only adapters trained on the same base",
        )


def _refuse_different_selection(adapters: Sequence[AdapterFiles]) -> None:
    for key in INHERITED_SELECTION:
        values = {repr(a.config.get(key)) for a in adapters}
        if len(values) > 1:
            raise BadInput(
                f"the adapters select layers differently ({key}: {', '.join(sorted(values))}); PEFT's combined "
                "adapter takes the first adapter's selection and would drop the others' modules",
                key=key,
                hint="combine adapters that target the same layers, or merge them one after another",
            )
    kinds = {type(a.config.get("target_modules")).__name__ for a in adapters}
    if "str" in kinds and len(kinds) > 1:
        raise BadInput(
            "some adapters give target_modules as a regular expression and others as a list; PEFT cannot join them",
            key="target_modules",
            hint="merge them one after another",
        )


def _refuse_rank_mismatch(kind: str, adapters: Sequence[AdapterFiles]) -> None:
    """Entrywise types add factor matrices: every module must have one rank across adapters, equal to the rank
    PEFT gives the combined adapter (the largest configured rank), or the combined adapter cannot be saved."""
    ranks: dict[str, dict[str, int]] = defaultdict(dict)
    for adapter in adapters:
        for key, tensor in adapter.tensors.items():
            parsed = parse_key(key)
            if parsed is not None and parsed.role in (Role.LORA_A, Role.EMBEDDING_A):
                ranks[parsed.module][str(adapter.path)] = int(tensor.shape[0])
    configured = {
        str(a.path): max([int(a.config.get("r", 8)), *(a.config.get("rank_pattern") or {}).values()]) for a in adapters
    }
    if len(set(configured.values())) > 1:
        raise BadInput(
            f"{kind} adds the adapters' factors entry by entry and needs one rank; configured ranks: "
            + ", ".join(f"{p}: r={r}" for p, r in configured.items()),
            key="r",
            hint="use --combination cat (exact for any ranks) or an *svd type",
        )
    rank = next(iter(configured.values()))
    for module, by_adapter in sorted(ranks.items()):
        odd = {p: r for p, r in by_adapter.items() if r != rank}
        if odd:
            raise BadInput(
                f"module {module} has rank {', '.join(f'{r} in {p}' for p, r in odd.items())}, but {kind} builds "
                f"every module of the combined adapter at rank {rank}",
                key="rank_pattern",
                hint="use --combination cat (exact for any ranks) or an *svd type",
            )


def _refuse_rank_beyond_modules(combination: Combination, adapters: Sequence[AdapterFiles], base_dir: Path) -> None:
    """PEFT cuts every module to one rank; a module smaller than that rank gets factors that do not fit together."""
    rank = svd_rank(combination, [a.config for a in adapters])
    shapes = loading.stored_shapes(base_dir)
    for module in sorted(targeted_modules(k for a in adapters for k in a.tensors)):
        shape = shapes.get(f"{module}.weight")
        if shape and len(shape) >= 2 and min(shape[0], math.prod(shape[1:])) < rank:
            raise BadInput(
                f"{combination.type} cuts every module to rank {rank}, but {module} is only "
                f"{shape[0]}x{math.prod(shape[1:])}: PEFT would build factors that do not fit together",
                key="r",
                hint=f"pass --svd-rank {min(shape[0], math.prod(shape[1:]))} or less, or use --combination cat",
            )
