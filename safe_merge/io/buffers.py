"""Reusable buffers for large temporaries made once per tensor (the stream backend's read, product, merge and read
back; the verifier's replayed product): allocated at the size of the largest tensor and reused for every tensor
after it.

Allocating and freeing buffers of tens of MB per tensor costs twice over: freed blocks above glibc's mmap
threshold go back to the system and are faulted in again for the next tensor (slow on a virtual machine), and
blocks of varying sizes allocated from two threads fragment the heap, so peak memory drifts upward run to run.
With fixed buffers peak memory is a fixed multiple of the largest tensor.
"""

from __future__ import annotations

import math

import torch


class Buffers:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._held: dict[str, torch.Tensor] = {}
        self.device = torch.device(device)

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` over the buffer kept for ``role`` (its old contents are garbage);
        it is valid until the next take of the same role."""
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        held = self._held.get(role)
        if held is None or held.numel() < nbytes:
            self._held.pop(role, None)
            held = self._held[role] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        return held[:nbytes].view(dtype).view(shape)
