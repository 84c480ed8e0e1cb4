"""MoE routing held fixed for the output check. A router picks each token's top-k experts; a correct merge in
bfloat16 rounds the router's inputs a little differently from the unmerged model, and where two experts score
almost alike the pick flips: a different expert's output, far beyond any rounding tolerance (measured: 0.41 on a
correct bfloat16 merge of a tiny gpt-oss, tolerance 0.044). So the merged model (and every copy the check runs)
takes the unmerged model's routing, recorded on the same probe; the experts' outputs are still compared. The
router's own weights are compared element by element by the weight check, as every weight is.

Routers are the modules whose class transformers names ``…Router`` (``Qwen3MoeTopKRouter``,
``GptOssTopKRouter``); a model without one (transformers 4.x computes routing inline) is compared as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
WRAPPER = ".base_layer"


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's routers by their path in the plain model (a PeftModel's prefix and wrappers removed)."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Router"):
            out[name.removeprefix(PEFT_PREFIX).replace(WRAPPER, "")] = module
    return out


@contextlib.contextmanager
def recording(model: nn.Module, store: dict) -> Iterator[None]:
    """Record each router's output into ``store`` while the block runs."""

    def record(name: str, output):
        store[name] = _detached(output)

    with _hooked(model, record):
        yield


@contextlib.contextmanager
def replaying(model: nn.Module, store: dict) -> Iterator[None]:
    """Replace each router's output with the recorded one (floating values in the dtype the router produced)."""

    def replay(name: str, output):
        return _like(store[name], output) if name in store else output

    with _hooked(model, replay):
        yield


@contextlib.contextmanager
def _hooked(model: nn.Module, act) -> Iterator[None]:
    """``act(router name, output)`` on every router's output while the block runs (what it returns, if anything,
    replaces the output)."""

    def hook_for(name: str):
        return lambda module, args, output: act(name, output)

    handles = [module.register_forward_hook(hook_for(name)) for name, module in routers(model).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def _like(recorded, produced):
    """``recorded`` in the dtypes of ``produced``, element by element."""
    if isinstance(recorded, torch.Tensor) and isinstance(produced, torch.Tensor):
        return recorded.to(produced.dtype) if recorded.is_floating_point() else recorded
    if isinstance(recorded, (tuple, list)) and isinstance(produced, (tuple, list)):
        return type(recorded)(_like(r, p) for r, p in zip(recorded, produced, strict=True))
    return recorded
