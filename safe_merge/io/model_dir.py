"""Write a merged model as a standalone checkpoint: sharded safetensors, configs, tokenizer; no adapter files."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from safe_merge.errors import BadInput
from safe_merge.io.checkpoint import Checkpoint
from safe_merge.io.shards import ShardWriter, Slot, parse_size, plan_shards, write_index

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
PROCESSOR_FILES = (  # transformers' names for image, video and audio processors (utils/__init__.py *_NAME)
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "audio_tokenizer_config.json",
)
CARRIED = (TOKENIZER_FILES, PROCESSOR_FILES)  # each group comes whole from one place (carried_source)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
DEFAULT_SHARD_SIZE = "5GB"


def carried_source(group: tuple[str, ...], adapter_dir: Path, base_dir: Path) -> Path | None:
    """Where a group of files beside the weights comes from: the adapter, when it saved any of them (a tokenizer
    with added tokens, a processor it was trained with), else the base."""
    for directory in (adapter_dir, base_dir):
        if any((directory / name).is_file() for name in group):
            return directory
    return None


def tokenizer_source(adapter_dir: Path, base_dir: Path) -> Path | None:
    """The adapter's own tokenizer when it saved one (it may add tokens), else the base's."""
    return carried_source(TOKENIZER_FILES, adapter_dir, base_dir)


def tokenizer_size(directory: Path) -> int | None:
    """Number of token ids a saved fast tokenizer can produce (highest id + 1), or None without tokenizer.json."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") or {}
    except (ValueError, AttributeError) as exc:
        raise BadInput(
            f"tokenizer.json is not a tokenizer ({type(exc).__name__}: {exc})",
            path=path,
            hint="save the tokenizer again with save_pretrained, or remove the broken file",
        ) from exc
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in data.get("added_tokens") or [] if "id" in t]
    return max(ids) + 1 if ids else None


def write_model(
    model: nn.Module, out: Path, base_dir: Path, adapter_dir: Path, max_shard_size: str = DEFAULT_SHARD_SIZE
) -> tuple[list[str], list[str]]:
    """Write ``model`` into ``out`` (an empty staging dir) with the project's shard writer and carry the files a
    user expects; returns the file names and notes for the report.

    transformers' save_pretrained is not called: it reverts the weight conversions of transformers 5 with reverse
    operations some releases lack (NotImplementedError), so a release could break a merge that is already done.
    Tensors are written under the names the base stores; only a tensor the base does not store under its
    in-memory name goes through transformers' reversal, and where that fails it keeps its in-memory name (the
    verifier then loads what was written, like any other output)."""
    state, notes = checkpoint_state(model, set(Checkpoint(base_dir).tensors))
    slots = [Slot(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()]
    shards = plan_shards(slots, parse_size(max_shard_size))
    for file_name, group in shards.items():
        writer = ShardWriter(out / file_name, group, {"format": "pt"})
        try:
            for slot in group:
                writer.write(slot.name, state[slot.name])
        except BaseException:
            writer.abort()
            raise
        writer.close()
    write_index(out, shards)
    write_configs(model, out)
    carry_files(out, base_dir, adapter_dir)
    return sorted(p.name for p in out.iterdir()), notes


def write_quantized_model(
    model: nn.Module, out: Path, base_dir: Path, adapter_dir: Path, max_shard_size: str = DEFAULT_SHARD_SIZE
) -> list[str]:
    """A model kept quantized: its tensors are its quantizer's to serialize (bitsandbytes' quant states, torchao's
    tensor subclasses), so transformers' save_pretrained writes them; then the files a user expects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    carry_files(out, base_dir, adapter_dir)
    for name in ADAPTER_FILES:  # a standalone model carries no adapter
        (out / name).unlink(missing_ok=True)
    return sorted(p.name for p in out.iterdir())


def checkpoint_state(model: nn.Module, stored: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors a checkpoint of ``model`` holds, by name: its state dict without the keys it asks not to save,
    one name per shared storage (a tie is written once, under the name the base stores, else the first), and a
    name the base does not store mapped back through transformers' conversions where it has them."""
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    kept: dict[tuple, str] = {}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in ignored:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in kept:
            if name in stored and kept[key] not in stored:  # the base's own name for the shared tensor wins
                state[name] = state.pop(kept[key])
                kept[key] = name
            continue
        kept[key] = name
        state[name] = tensor
    others = {n: t for n, t in state.items() if n not in stored}
    if not others:
        return state, []
    reverted, notes = _revert_conversions(model, others)
    return {**{n: t for n, t in state.items() if n in stored}, **reverted}, notes


def _revert_conversions(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: loading converts nothing, the in-memory names are the checkpoint's
        return tensors, []
    try:
        return dict(revert_weight_conversion(model, dict(tensors))), []
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        return tensors, [
            f"{len(tensors)} tensors the base does not store under their in-memory names were written under those "
            f"names: this transformers cannot map them back ({type(exc).__name__}: {first}); the verifier loaded "
            "them from the output"
        ]


def write_configs(model: nn.Module, out: Path) -> None:
    """config.json as save_pretrained writes it in every release: the dtype of the weights, the class, the
    attention implementation left to the loader (4.4x), generation settings found in the model config moved to the
    generation config (config.save_pretrained refuses them from 4.41); then the generation config of a model that
    generates (the base's own replaces it in carry_files)."""
    config = model.config
    dtype = str(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32))
    setattr(config, "dtype" if "dtype" in config.to_dict() else "torch_dtype", dtype.removeprefix("torch."))
    config.architectures = [type(model).__name__]
    if hasattr(config, "_attn_implementation_autoset"):
        config._attn_implementation_autoset = False
    can_generate = getattr(model, "can_generate", lambda: False)() and getattr(model, "generation_config", None)
    misplaced = getattr(config, "_get_non_default_generation_parameters", dict)()
    if can_generate and misplaced:
        for name, value in misplaced.items():
            setattr(model.generation_config, name, value)
            setattr(config, name, None)
    config.save_pretrained(str(out))
    if can_generate:
        model.generation_config.save_pretrained(str(out))


def carry_files(out: Path, base_dir: Path, adapter_dir: Path) -> None:
    """The files a user expects beside the weights: the base's generation config, the tokenizer and the processor
    (each the adapter's own when it saved one)."""
    base_generation = base_dir / "generation_config.json"
    if base_generation.is_file():
        shutil.copyfile(base_generation, out / "generation_config.json")
    for group in CARRIED:
        source = carried_source(group, adapter_dir, base_dir)
        for name in group if source is not None else ():
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
