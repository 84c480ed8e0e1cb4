"""What the stream backend needs to know about the model without building it: each targeted module's weight
layout, which weights are tied, and where every output tensor goes.

The layout of a LoRA-targeted weight follows from shapes: lora_A is [r, in] and lora_B is [out, r], so a stored
[out, in] weight is a Linear and [in, out] is GPT-2's Conv1D (PEFT merges those with fan_in_fan_out, whatever the
config says); an embedding carries lora_embedding_A/B. A square weight fits both, so the module's class decides:
the model types listed in CONV1D_MODULES build those modules as Conv1D.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.keys import Role, parse_key
from safe_merge.io.checkpoint import Checkpoint
from safe_merge.verifier.delta import LayerKind

# transformers model types whose attention and MLP projections are Conv1D (weight stored [in, out])
CONV1D_MODULES = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
    "imagegpt": ("c_attn", "c_proj", "c_fc"),
    "decision_transformer": ("c_attn", "c_proj", "c_fc", "q_attn"),
}
OUTPUT_EMBEDDING = "lm_head.weight"


@dataclass
class Layout:
    kinds: dict[str, LayerKind] = field(default_factory=dict)  # targeted module -> weight layout
    problems: dict[str, str] = field(default_factory=dict)  # targeted module -> why its layout is unknown
    tied: tuple[str, str] | None = None  # (output name missing from the checkpoint, the stored tensor it shares)


def module_roles(adapter: AdapterFiles) -> dict[str, dict[Role, str]]:
    """The adapter's LoRA tensors grouped by the module they sit on."""
    out: dict[str, dict[Role, str]] = {}
    for key in adapter.tensors:
        parsed = parse_key(key)
        if parsed is not None and parsed.role in (
            Role.LORA_A,
            Role.LORA_B,
            Role.EMBEDDING_A,
            Role.EMBEDDING_B,
            Role.MAGNITUDE,
            Role.LORA_B_BIAS,
        ):
            out.setdefault(parsed.module, {})[parsed.role] = key
    return out


def infer_layout(adapter: AdapterFiles, checkpoint: Checkpoint, config: Mapping) -> Layout:
    layout = Layout(tied=tied_pair(checkpoint, config))
    aliases = dict([layout.tied]) if layout.tied else {}
    model_type = str(config.get("model_type") or "")
    for module, roles in module_roles(adapter).items():
        name = aliases.get(f"{module}.weight", f"{module}.weight")
        info = checkpoint.tensors.get(name)
        if info is None:
            continue  # the ledger names it unmatched
        if Role.EMBEDDING_A in roles or Role.EMBEDDING_B in roles:
            layout.kinds[module] = LayerKind.EMBEDDING
            continue
        if Role.LORA_A not in roles or Role.LORA_B not in roles:
            continue
        a = adapter.tensors[roles[Role.LORA_A]].shape
        b = adapter.tensors[roles[Role.LORA_B]].shape
        shape = info.shape
        if len(shape) != 2 or len(a) != 2 or len(b) != 2:
            layout.problems[module] = f"a {len(shape)}-d weight: convolutions are merged by the PEFT backend"
            continue
        linear, transposed = shape == (b[0], a[1]), shape == (a[1], b[0])
        conv1d = module.rpartition(".")[2] in CONV1D_MODULES.get(model_type, ())
        if transposed and (conv1d or not linear):
            layout.kinds[module] = LayerKind.LINEAR_FIFO
        elif linear:
            layout.kinds[module] = LayerKind.LINEAR
        else:
            layout.problems[module] = f"weight {shape} fits neither lora_A {tuple(a)} nor lora_B {tuple(b)}"
    return layout


def tied_pair(checkpoint: Checkpoint, config: Mapping) -> tuple[str, str] | None:
    """(lm_head.weight, the input embedding it shares) when the model ties them and the checkpoint stores only the
    embedding: a causal LM (its output embedding is ``lm_head``) whose config does not untie them, and one stored
    tensor with vocab_size rows named as transformers names input embeddings."""
    if not might_tie(config) or OUTPUT_EMBEDDING in checkpoint:
        return None
    architectures = config.get("architectures") or []
    if not architectures or not str(architectures[0]).endswith(("ForCausalLM", "LMHeadModel")):
        return None
    rows = [n for n in vocab_rows(checkpoint, config) if n.rpartition(".")[0].rpartition(".")[2] in INPUT_EMBEDDINGS]
    return (OUTPUT_EMBEDDING, rows[0]) if len(rows) == 1 else None


INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


def might_tie(config: Mapping) -> bool:
    """Whether the config leaves weight tying on (transformers' default when the key is absent)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)) is not False


def vocab_rows(checkpoint: Checkpoint, config: Mapping) -> list[str]:
    """Stored 2-d floating tensors with vocab_size rows: the tensors an output embedding could be tied to."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab = text.get("vocab_size", config.get("vocab_size"))
    return [n for n, i in checkpoint.tensors.items() if len(i.shape) == 2 and i.shape[0] == vocab and i.floating]


class BaseView(Mapping):
    """The base's parameters by name, read on demand (a tied output embedding answers with what it shares)."""

    def __init__(self, checkpoint: Checkpoint, layout: Layout, dtype: torch.dtype | None = None):
        self.checkpoint = checkpoint
        self.aliases = dict([layout.tied]) if layout.tied else {}
        self.dtype = dtype

    def source(self, name: str) -> str:
        return self.aliases.get(name, name)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        tensor = self.checkpoint.read(self.source(name))
        floating = tensor.is_floating_point()
        return tensor.to(self.dtype) if self.dtype is not None and floating else tensor

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.checkpoint.tensors or name in self.aliases)

    def __iter__(self) -> Iterator[str]:
        yield from self.checkpoint.tensors
        yield from self.aliases

    def __len__(self) -> int:
        return len(self.checkpoint.tensors) + len(self.aliases)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.checkpoint.tensors[self.source(name)].shape)


class LedgerView(BaseView):
    """The base as the ledger sees it: also the fused expert stacks a target_parameters adapter names, which the
    checkpoint stores per expert (their shapes only: a stack is never read whole)."""

    def __init__(self, checkpoint: Checkpoint, layout: Layout, stacks: Mapping):
        super().__init__(checkpoint, layout)
        self.stacks = stacks

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.stacks:
            raise KeyError(f"{name} is stored per expert; the stream backend reads its pieces")
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        return name in self.stacks or super().__contains__(name)

    def __iter__(self) -> Iterator[str]:
        yield from super().__iter__()
        yield from self.stacks

    def __len__(self) -> int:
        return super().__len__() + len(self.stacks)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.stacks[name].shape) if name in self.stacks else super().shape_of(name)
