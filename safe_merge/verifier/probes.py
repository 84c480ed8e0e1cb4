"""Deterministic probe inputs built from a model config, and the one output tensor to compare."""

from __future__ import annotations

import torch

PROBE_BATCH = 2
PROBE_LENGTH = 32  # positions the output check covers (up to the base config's limit)
PROBE_SEED = 1234


def probe_inputs(config) -> dict[str, torch.Tensor] | None:
    """Inputs the model can run on, the same on every call; None when the config says too little to build them."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    inputs: dict[str, torch.Tensor] = {}
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        length = min(PROBE_LENGTH, limit) if limit else PROBE_LENGTH
        ids = torch.randint(0, int(vocab), (PROBE_BATCH, length), generator=gen)
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones_like(ids)
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, : max(1, length // 2)]
        return inputs
    image_size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if image_size and channels:
        size = image_size if isinstance(image_size, int) else int(image_size[0])
        inputs["pixel_values"] = torch.randn(PROBE_BATCH, channels, size, size, generator=gen)
        return inputs
    return None


def main_output(output) -> torch.Tensor:
    """The tensor that stands for a model's answer: logits when there are any, else the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if hasattr(output, "values") else output
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no tensor in the model output ({type(output).__name__})")
