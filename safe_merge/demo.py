"""`safe-merge demo`: a tiny Llama with its own tokenizer and a LoRA adapter, built offline, merged and verified."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from safe_merge.io import staging
from safe_merge.io.output_path import check_output
from safe_merge.merger.pipeline import MergeRequest, merge_command

CORPUS = (
    "safe merge turns a lora adapter into a standalone model and proves the merge is right "
    "the merged model must answer exactly like the adapter on its base"
)
SPECIAL = ("<unk>", "<pad>", "<s>", "</s>")


def build_tokenizer(directory: Path):
    """A word-level tokenizer over the demo corpus, made and saved without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL) + sorted(set(CORPUS.split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(directory))
    return fast


def build_base(directory: Path, vocab_size: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
        attention_bias=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(directory))


def build_adapter(base_dir: Path, directory: Path) -> None:
    """An r=8 LoRA on attention and MLP projections with trained attention biases (bias="all"), non-zero lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(str(base_dir))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, bias="all", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or name.endswith("_proj.base_layer.bias"):
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(directory))


def write_as_peft_0_6(adapter_dir: Path, directory: Path) -> dict:
    """The same adapter as PEFT 0.6 would have saved it: fewer config keys, and each targeted layer's trained bias
    under `q_proj.bias` (current PEFT reads only `q_proj.base_layer.bias`, and would silently drop it)."""
    from safe_merge.compat.adapter_files import load_adapter
    from safe_merge.compat.plan import make_plan, write_state

    plan, state = make_plan(load_adapter(adapter_dir), "0.6.2")
    directory.mkdir(parents=True, exist_ok=True)
    write_state(state, adapter_dir, directory)
    return plan.report()


def run_demo(out: Path | None = None, force: bool = False) -> dict:
    """Build, merge, verify; the report of the merge, with the demo's paths. ``out`` (kept afterwards) appears
    only when the demo passed, and replaces an existing directory only with ``force``."""
    if out is None:
        return _demo(Path(tempfile.mkdtemp(prefix="safe-merge-demo-")))
    out = check_output(Path(out), {}, force=force)
    stale = staging.sweep_stale(out.parent)
    try:
        with staging.staged(out, force) as stage:
            report = _renamed(_demo(stage), str(stage), str(out))
            report["warnings"] = stale + report.get("warnings", [])
            if report["exit_code"] != 0:
                raise _Failed(report)
    except _Failed as failed:
        failed.report["demo"] = {"workdir": None, "not_kept": f"the demo's merge {failed.report['status']}"}
        return failed.report
    return report


def _demo(workdir: Path) -> dict:
    base_dir, adapter_dir, merged_dir = workdir / "base", workdir / "adapter", workdir / "merged"
    tokenizer = build_tokenizer(base_dir)
    build_base(base_dir, len(tokenizer))
    build_adapter(base_dir, workdir / "adapter-trained")
    write_as_peft_0_6(workdir / "adapter-trained", adapter_dir)
    report = merge_command(MergeRequest(str(base_dir), [str(adapter_dir)], merged_dir))
    report["demo"] = {"workdir": str(workdir), "base": str(base_dir), "adapter (PEFT 0.6 format)": str(adapter_dir)}
    return report


class _Failed(Exception):
    def __init__(self, report: dict):
        super().__init__(report["status"])
        self.report = report


def _renamed(value, old: str, new: str):
    """The report with the staging dir's paths replaced by where the demo is published."""
    if isinstance(value, dict):
        return {k: _renamed(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, old, new) for v in value]
    if isinstance(value, str) and value.startswith(old):
        return new + value[len(old) :]
    return value
