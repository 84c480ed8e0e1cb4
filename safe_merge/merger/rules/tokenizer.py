"""The tokenizer that goes into OUT must not produce ids the model has no embedding row for."""

from __future__ import annotations

from pathlib import Path

from safe_merge.errors import BadInput
from safe_merge.io.model_dir import tokenizer_size, tokenizer_source


def tokenizer_fits(config, base_dir: Path, adapter_dir: Path) -> None:
    source = tokenizer_source(adapter_dir, base_dir)
    size = tokenizer_size(source) if source else None
    rows = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
    if size and rows and size > rows:
        raise BadInput(
            f"the tokenizer has {size} token ids but the model's embedding has {rows} rows",
            path=source / "tokenizer.json",
            hint="resize the base's embeddings to the tokenizer (and train them) before merging, "
            "or merge with the tokenizer the adapter was trained with",
        )
