"""Fixtures the merger tests share."""

from __future__ import annotations

import pytest

from tests.quant.stored import checkpoints


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny bfloat16 Llama (hidden 64, 2 layers) and a LoRA on q/v/down, written once per test module."""
    root = tmp_path_factory.mktemp("llama")
    float_dir = checkpoints.float_model(root)
    return float_dir, checkpoints.adapter_for(float_dir, root)
