"""Tiny MoE models of real transformers architectures, for the tests of LoRA on expert stacks: expert widths
unlike the hidden size, so that no stack is square and a layout mistake shows in the shapes."""

from __future__ import annotations

import torch
import transformers

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=32,
    head_dim=8,
    num_experts_per_tok=2,
)
EXPERTS = 4
MODELS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=8, num_experts=EXPERTS)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=8, num_local_experts=EXPERTS)),
}


def tiny_moe(arch: str, seed: int = 0) -> torch.nn.Module:
    """The architecture built tiny with random weights (seeded), in eval mode."""
    config_cls, model_cls, extra = MODELS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    return getattr(transformers, model_cls)(config).eval()


def fused(arch: str) -> bool:
    """Whether the installed transformers builds this architecture's experts as stacks (transformers 5)."""
    return any(p.dim() == 3 for p in tiny_moe(arch).parameters())
