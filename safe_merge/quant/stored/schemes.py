"""compressed-tensors' quantization_config: which scheme (config_groups) quantizes a module, and its weight
settings as a tile of the weight (strategy tensor, channel, group or block)."""

from __future__ import annotations

import re
from collections.abc import Mapping


def weight_args(quant: Mapping, name: str) -> dict:
    """The ``weights`` settings of the scheme that targets the module holding ``name``: a scheme naming it (by
    "re:" pattern or by name) before one that names a layer class (such as "Linear")."""
    module = name.rsplit(".", 1)[0]
    by_class = None
    for scheme in (quant.get("config_groups") or {}).values():
        if not isinstance(scheme, Mapping) or not scheme.get("weights"):
            continue
        for target in scheme.get("targets") or []:
            target = str(target)
            if target.startswith("re:") and re.match(target[3:], module):
                return dict(scheme["weights"])
            if target == module or module.endswith("." + target):
                return dict(scheme["weights"])
            if "." not in target and target[:1].isupper() and by_class is None:
                by_class = dict(scheme["weights"])
    return by_class or {}


def scheme_tiles(quant: Mapping, name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The tile one scale covers: None for the whole weight (strategy tensor)."""
    args = weight_args(quant, name)
    strategy = args.get("strategy") or "tensor"
    cols = int(shape[-1])
    if strategy == "channel":
        return (1, cols)
    if strategy in ("group", "tensor_group"):
        return (1, int(args.get("group_size") or cols))
    if strategy == "block":
        block = args.get("block_structure") or [shape[-2], cols]
        return (int(block[0]), int(block[1]))
    return None
