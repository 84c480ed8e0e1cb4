"""Deterministic probe inputs built from a model's config and class, and the one output tensor to compare.

What a model takes is read from the model itself: its class's ``main_input_name`` (token ids, pixel values, log-mel
features, raw audio) and the nested text / vision configs. A multimodal model is probed through its language
model with text alone (ids that never hit an image or video placeholder): that is where a LoRA on it usually sits,
and it needs no preprocessor. None only for a model whose config says too little to build any of these.
"""

from __future__ import annotations

import torch

PROBE_BATCH = 2
PROBE_LENGTH = 32  # positions the output check covers (up to the base config's limit)
PROBE_SEED = 1234
AUDIO_FRAMES = 4  # feature-extractor frames a raw-audio probe yields

# config attributes holding placeholder ids: a random id that hits one makes the model expect an image
PLACEHOLDERS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "audio_token_id",
    "boi_token_index",
    "eoi_token_index",
    "boi_token_id",
    "eoi_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)
# RoBERTa-style position ids start after the padding index: two positions fewer than max_position_embeddings
OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2, "data2vec-text": 2}


def recorded_class(config) -> type | None:
    """The class the config records, or None where transformers cannot import it here."""
    from safe_merge.io.loading import model_class

    try:
        return model_class(config)
    except Exception:
        return None


def main_input_name(config, cls: type | None = None) -> str:
    """What the model's class (``cls``, else the one its config records) takes first (``input_ids`` for text)."""
    name = getattr(cls or recorded_class(config), "main_input_name", None)
    if isinstance(name, str):
        return name
    if getattr(config, "num_mel_bins", None):
        return "input_features"
    if getattr(config, "conv_kernel", None):
        return "input_values"
    return "input_ids"


def probe_inputs(config, cls: type | None = None) -> dict[str, torch.Tensor] | None:
    """Inputs the model (of class ``cls``, else the one its config records) can run on, the same on every call;
    None when the config says too little to build them."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    cls = cls or recorded_class(config)
    main = main_input_name(config, cls)
    if main == "input_features" and getattr(config, "max_source_positions", None):
        return _log_mel(config, gen)
    if main == "input_values" and getattr(config, "conv_kernel", None):
        return {"input_values": torch.randn(PROBE_BATCH, _audio_samples(config), generator=gen)}
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    if vocab:
        # a decoder classifier reads the last non-pad position; without a pad id it takes one sequence at a time
        one = cls is not None and cls.__name__.endswith("ForSequenceClassification")
        one = one and getattr(config, "pad_token_id", None) is None and not getattr(config, "is_encoder_decoder", False)
        return _text(config, text, int(vocab), gen, 1 if one else PROBE_BATCH)
    vision = getattr(config, "vision_config", None)
    vision = vision if vision is not None and not isinstance(vision, dict) else config
    image_size = getattr(vision, "image_size", None)
    channels = getattr(vision, "num_channels", None) or (3 if image_size else None)
    if image_size and channels:
        size = image_size if isinstance(image_size, int) else int(image_size[0])
        return {"pixel_values": torch.randn(PROBE_BATCH, channels, size, size, generator=gen)}
    return None


def _text(config, text, vocab: int, gen: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    limit = (
        getattr(text, "max_position_embeddings", None)
        or getattr(text, "n_positions", None)
        or getattr(config, "max_position_embeddings", None)
    )
    if limit:
        limit -= OFFSET_POSITIONS.get(getattr(config, "model_type", ""), 0)
    length = min(PROBE_LENGTH, limit) if limit else PROBE_LENGTH
    ids = _ids(gen, vocab, (batch, length), _placeholders(config))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, : max(1, length // 2)]
    return inputs


def _log_mel(config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Whisper-style encoders take exactly 2 · max_source_positions frames of num_mel_bins features."""
    frames = 2 * int(config.max_source_positions)
    inputs = {"input_features": torch.randn(PROBE_BATCH, int(config.num_mel_bins), frames, generator=gen)}
    if getattr(config, "is_encoder_decoder", False):
        length = min(PROBE_LENGTH // 2, int(getattr(config, "max_target_positions", PROBE_LENGTH)))
        decoder = _ids(gen, int(config.vocab_size), (PROBE_BATCH, length), _placeholders(config))
        start = getattr(config, "decoder_start_token_id", None)
        if isinstance(start, int):
            decoder[:, 0] = start
        inputs["decoder_input_ids"] = decoder
    return inputs


def _audio_samples(config) -> int:
    """Raw samples that the convolutional feature extractor turns into AUDIO_FRAMES frames."""
    n = AUDIO_FRAMES
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=False))):
        n = (n - 1) * int(stride) + int(kernel)
    return n


def _placeholders(config) -> set[int]:
    found = set()
    for owner in (config, getattr(config, "text_config", None)):
        for name in PLACEHOLDERS:
            value = getattr(owner, name, None) if owner is not None and not isinstance(owner, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                found.add(value)
    return found


def _ids(gen: torch.Generator, vocab: int, shape: tuple[int, int], avoid: set[int]) -> torch.Tensor:
    """Token ids in [0, vocab) that never hit a placeholder id (which would make the model expect an image)."""
    ids = torch.randint(0, vocab, shape, generator=gen)
    free = next((i for i in range(vocab) if i not in avoid), 0)
    for placeholder in avoid:
        ids[ids == placeholder] = free
    return ids


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
