"""What the adapter file says must change, read from its keys and the base's tensor names alone.

The ledger (ledger.py) is shared: the merge backends build their work from it and the weight check its
expectations. A mistake in it (an adapter tensor put down as skipped, a LoRA put on the wrong module) would then
be made by both, and the weight check would agree with the merge. These checks stand apart from it:

- every LoRA factor in the adapter file names a module; where the base has a weight at that path (or the path
  ends the base's name, as when a model is nested one level deeper), that weight must be among the tensors the
  weight check compared with a merge;
- only PEFT's spare copies of saved modules (``.original_module.``) carry nothing to merge: any other adapter
  tensor the ledger skips is a problem, whatever the ledger's reason;
- a merged config that still ties two weights (an input embedding and its LM head) while the adapter changes one
  of them makes the other move too, which the unmerged model never does (ties_problems; trainable tokens, which do
  move both sides in PEFT, are not LoRA factors and do not count).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from safe_merge.verifier.ledger import Ledger, Status

PREFIX = "base_model.model."
SPARE = ".original_module."
FACTORS = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_magnitude_vector.weight",
    ".lora_magnitude_vector",
)


def factor_paths(keys: Iterable[str]) -> dict[str, str]:
    """Each LoRA factor key mapped to the weight path its module names (whether or not the base stores it)."""
    out = {}
    for key in keys:
        suffix = next((s for s in FACTORS if key.endswith(s)), None)
        if suffix is not None:
            out[key] = key.removeprefix(PREFIX)[: -len(suffix)] + ".weight"
    return out


def changed_by(keys: Iterable[str], base_names: Iterable[str]) -> dict[str, str]:
    """Each LoRA factor key mapped to the base weight it changes, where the base has one at its module's path."""
    names = set(base_names)
    out = {}
    for key, path in factor_paths(keys).items():
        if path in names:
            out[key] = path
            continue
        deeper = [n for n in names if n.endswith("." + path)]
        if len(deeper) == 1:
            out[key] = deeper[0]
    return out


def accounting_problems(
    keys: Iterable[str], ledger: Ledger, base_names: Iterable[str], checked: Iterable[str]
) -> list[str]:
    """The adapter file against the ledger and the tensors the weight check compared with a merge."""
    out = [
        f"adapter tensor {e.key}: the ledger skips it ({e.reason}); only PEFT's spare copies of saved modules "
        "(.original_module.) carry nothing to merge"
        for e in ledger.entries
        if e.status is Status.SKIPPED and SPARE not in e.key
    ]
    compared = set(checked)
    for key, target in sorted(changed_by(keys, base_names).items()):
        if target not in compared:
            out.append(f"adapter tensor {key} changes {target}, but no merge of it was checked (ledger left it out)")
    return out


def ties_problems(groups: Iterable[list[str]], changed: Mapping[str, str]) -> list[str]:
    """Tied groups of the merged model (as its config builds it) in which the adapter changes a member."""
    targets = set(changed.values())
    out = []
    for group in groups:
        hit = [n for n in group if n in targets]
        others = [n for n in group if n not in targets]
        if hit and others:
            out.append(
                f"{others[0]}: the merged config ties it to {hit[0]}, which the adapter changes, so it would change "
                "too (the unmerged model keeps it as it was); write it apart and set tie_word_embeddings false"
            )
    return out
