"""The task head an adapter brings: PEFT's task types with a head (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) save it in
modules_to_save, and AutoPeftModelFor* load the base in the task's class, so the same adapter merges onto a base
saved as BertForPreTraining or BertModel, or a reward-model adapter onto a causal-LM checkpoint. The head's size
(num_labels) is the saved head's: the base's config may name another."""

from __future__ import annotations

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.keys import Role, parse_key

HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
# the last projection of a head, whose rows are the labels (BERT's classifier, RoBERTa's classifier.out_proj,
# Llama's score)
LABEL_WEIGHTS = ("classifier.out_proj.weight", "classifier.weight", "score.weight")


def task(adapter: AdapterFiles) -> str | None:
    value = adapter.config.get("task_type")
    return value if value in HEAD_TASKS else None


def saved_params(adapter: AdapterFiles) -> frozenset[str]:
    """The base parameters the adapter saves whole (its head among them)."""
    roles = (Role.PARAM, Role.BASE_LAYER_PARAM)
    return frozenset(p.param for p in map(parse_key, adapter.tensors) if p is not None and p.role in roles)


def load_kwargs(adapter: AdapterFiles) -> dict:
    """How to load the base for this adapter (io.loading.load_model's task, num_labels and supplied)."""
    head_task = task(adapter)
    if head_task is None:
        return {}
    saved = {p.param: p.key for p in map(parse_key, adapter.tensors) if p is not None and p.role is Role.PARAM}
    labels = None
    if head_task != "QUESTION_ANS":
        name = next((n for n in LABEL_WEIGHTS if n in saved), None)
        labels = int(adapter.tensors[saved[name]].shape[0]) if name else None
    return {"task": head_task, "num_labels": labels, "supplied": saved_params(adapter)}


def expected_config(base_config: dict, class_name: str, labels: int | None) -> dict:
    """The config fields a head task changes: the class save_pretrained records, and the labels when the head's
    size differs from the base config's."""
    changes: dict = {"architectures": [class_name]}
    known = base_config.get("id2label")
    if labels is not None and (not isinstance(known, dict) or len(known) != labels):
        changes["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        changes["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    return changes
