"""layer_replication: PEFT builds a deeper stack from the base's layers (``[[0, 2], [1, 2]]`` makes layers 0, 1,
1), the copies sharing the base weights while each carries its own LoRA. The adapter's keys index the deeper
stack. PEFT's merge adds every copy's delta into the one shared tensor (wrong: each layer then holds the sum);
the right merged model gives each layer of the deeper stack its own weights, its source layer's plus its delta.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

# the layer lists PEFT's replicate_layers knows (Llama-style, BERT-style, Falcon/GPT-style), by their last name
_LAYER_LIST = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h))\.(?P<index>\d+)\.(?P<rest>.+)$")


def layer_sources(config: Mapping) -> list[int] | None:
    """For each layer of the deeper stack, the base layer it copies; None without layer_replication."""
    spans = config.get("layer_replication")
    if not spans:
        return None
    return [i for start, end in spans for i in range(int(start), int(end))]


def layer_prefix(names) -> str | None:
    """The path of the model's layer list (``model.layers``): the list-like prefix most parameters sit under."""
    counts = Counter(m["prefix"] for m in map(_LAYER_LIST.match, names) if m)
    return counts.most_common(1)[0][0] if counts else None


def expand(params: Mapping, sources: list[int], prefix: str) -> dict:
    """``params`` (name → anything) as the deeper stack names them: layer i holds what base layer sources[i]
    held; everything outside the layer list stays."""
    out, by_layer = {}, {}
    for name, value in params.items():
        match = _LAYER_LIST.match(name)
        if match and match["prefix"] == prefix:
            by_layer.setdefault(int(match["index"]), []).append((match["rest"], value))
        else:
            out[name] = value
    for i, source in enumerate(sources):
        for rest, value in by_layer.get(source, []):
            out[f"{prefix}.{i}.{rest}"] = value
    return out


def expected_config_changes(base: Mapping, sources: list[int]) -> dict:
    """The config fields the deeper stack changes: its depth, and per-layer lists (layer_types) copied along."""
    changes: dict = {"num_hidden_layers": len(sources)}
    types = base.get("layer_types")
    if isinstance(types, list) and len(types) == base.get("num_hidden_layers"):
        changes["layer_types"] = [types[i] for i in sources]
    return changes
