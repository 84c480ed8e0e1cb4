"""The exact effect of one LoRA module on its base weight, computed in float64 from the adapter's own tensors.

This is the verifier's reference: it never asks PEFT what the merge should be, so a bug shared by PEFT and the
merge backend still shows up. Layouts follow the stored base weight:

- LINEAR       weight [out, in];            delta = s · B @ A
- LINEAR_FIFO  weight [in, out] (GPT-2 Conv1D, fan_in_fan_out); delta = s · (B @ A)ᵀ
- EMBEDDING    weight [vocab, dim]; A is [r, vocab], B is [dim, r]; delta = s · (B @ A)ᵀ
- CONV         weight [out, in, *kernel]; A is [r, in, *kernel], B is [out, r, 1, ...]; delta = s · B ⊗ A
- EXPERTS      a 3-D parameter [E, out, in] (MoE experts, target_parameters); A is [E·r, in] expert-major,
               B is [out, r·E] expert-minor (PEFT's ParamWrapper); delta[e] = s · B[:, :, e] @ A[e]
- EXPERTS_T    the same on a parameter stored [E, in, out] (gpt-oss); delta[e] = s · (B[:, :, e] @ A[e])ᵀ
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import torch


class LayerKind(enum.Enum):
    LINEAR = "linear"
    LINEAR_FIFO = "linear_fan_in_fan_out"
    EMBEDDING = "embedding"
    CONV = "conv"
    EXPERTS = "experts"
    EXPERTS_T = "experts_transposed"

    @property
    def experts(self) -> bool:
        return self in (LayerKind.EXPERTS, LayerKind.EXPERTS_T)

    @property
    def out_axis(self) -> int:
        """Axis of the stored weight that indexes output features (the axis DoRA keeps a magnitude for)."""
        return 1 if self in (LayerKind.LINEAR_FIFO, LayerKind.EMBEDDING) else 0


@dataclass(frozen=True)
class ModuleLora:
    """The tensors of one targeted module, as float64."""

    module: str
    kind: LayerKind
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA
    bias: torch.Tensor | None = None  # lora_B.bias (lora_bias=True)
    compute_dtype: torch.dtype = torch.float32  # precision the adapter's tensors carry (at least float32)
    param: str | None = None  # the parameter it merges into, when not ``{module}.weight`` (target_parameters)
    num_experts: int = 1
    rounds_like: LayerKind | None = None  # the kind whose rounding PEFT applies, when not ``kind`` (an expert piece)

    @property
    def target(self) -> str:
        """The base parameter this LoRA merges into."""
        return self.param or f"{self.module}.weight"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0]) // self.num_experts

    def on(self, device: torch.device) -> ModuleLora:
        """The same module with its tensors on ``device`` (the merge's arithmetic; the checks stay on the CPU)."""

        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(self, a=to(self.a), b=to(self.b), magnitude=to(self.magnitude), bias=to(self.bias))

    def widened(self, dtype: torch.dtype = torch.float64) -> ModuleLora:
        """The same module with its tensors in ``dtype`` (a ledger built without widening holds them as stored)."""

        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        return dataclasses.replace(self, a=to(self.a), b=to(self.b), magnitude=to(self.magnitude), bias=to(self.bias))


def low_rank_delta(lora: ModuleLora) -> torch.Tensor:
    """scale · B·A, laid out like the stored base weight."""
    a, b, s = lora.a, lora.b, lora.scale
    if lora.kind.experts:
        e = lora.num_experts
        per_a = a.reshape(e, -1, a.shape[-1])  # [E, r, in]
        per_b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # [E, out, r]
        product = s * torch.bmm(per_b, per_a)
        return product if lora.kind is LayerKind.EXPERTS else product.transpose(1, 2)
    if lora.kind is LayerKind.LINEAR:
        return s * (b @ a)
    if lora.kind in (LayerKind.LINEAR_FIFO, LayerKind.EMBEDDING):
        return s * (b @ a).T
    # Conv: B's kernel is 1×1…; contract the rank axis.
    b2 = b.reshape(b.shape[0], b.shape[1])
    return s * torch.einsum("or,r...->o...", b2, a)


def product_magnitude(lora: ModuleLora) -> torch.Tensor:
    """|scale| · |B|·|A| in the weight's layout: the size of the terms the delta sums, which bounds the rounding
    error of computing B·A (it can be far larger than |delta| where the terms cancel)."""
    absolute = dataclasses.replace(
        lora, a=lora.a.abs(), b=lora.b.abs(), scale=abs(lora.scale), magnitude=None, bias=None
    )
    return low_rank_delta(absolute)


def dora_factor(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, kind: LayerKind) -> torch.Tensor:
    """DoRA's per-output-feature factor m / ‖W + ΔW‖, shaped to broadcast over the stored weight."""
    combined = weight + delta
    axis = kind.out_axis
    reduce_dims = tuple(d for d in range(combined.dim()) if d != axis)
    norm = torch.linalg.vector_norm(combined, dim=reduce_dims, keepdim=True)
    shape = [1] * combined.dim()
    shape[axis] = -1
    return magnitude.reshape(shape) / norm


def merged_weight(weight: torch.Tensor, lora: ModuleLora) -> torch.Tensor:
    """The exact merged weight (float64) for a base weight and one module's LoRA."""
    delta = low_rank_delta(lora)
    if delta.shape != weight.shape:
        raise ValueError(f"{lora.module}: LoRA delta has shape {tuple(delta.shape)}, base weight {tuple(weight.shape)}")
    if lora.magnitude is not None:
        return dora_factor(weight, delta, lora.magnitude, lora.kind) * (weight + delta)
    return weight + delta


def merged_bias(bias: torch.Tensor, lora: ModuleLora) -> torch.Tensor:
    """The exact merged bias: lora_B's bias enters scaled, like the forward pass."""
    assert lora.bias is not None
    return bias + lora.scale * lora.bias
