"""Adapters that are right only on a base PEFT rewrites while loading them (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA
inits saved without conversion; KaSA). The saved A and B were trained against that rewritten base, so merging
them into the base as stored gives a different model; which values do so is data (history.json)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from safe_merge.compat.history import History


@dataclass(frozen=True)
class BaseRewrite:
    key: str
    value: object
    why: str
    convertible: bool  # PEFT can save the trained adapter again as a plain LoRA on the unchanged base

    def hint(self) -> str:
        if self.convertible:
            return (
                "save the trained adapter again with PEFT's save_pretrained(..., "
                "path_initial_model_for_weight_conversion=<the adapter as initialised, before training>): "
                "it writes a plain LoRA (rank 2r) that merges into the unchanged base"
            )
        return (
            "merge it with PEFT itself (PeftModel.from_pretrained, then merge_and_unload()): safe-merge cannot check it"
        )


def base_rewrites(config: Mapping, history: History | None = None) -> list[BaseRewrite]:
    """What in an adapter_config makes PEFT rewrite the base at load (empty: nothing does)."""
    history = history or History.load()
    found = []
    init = config.get("init_lora_weights")
    if isinstance(init, str):
        info = history.init_values.get(init.split("_niter_")[0])
        if info is not None and info["kind"] == "rewrites_base":
            found.append(BaseRewrite("init_lora_weights", init, f"the {init!r} init rewrites the base weights", True))
    for key, why in history.base_rewriting_keys.items():
        if config.get(key) is not None:
            found.append(BaseRewrite(key, config[key], why, False))
    return found
