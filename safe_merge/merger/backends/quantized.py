"""The quantized backend: the PEFT backend on a quantized base, merged by policy (--quantized dequantize: into the
float twin, written as a float model; requantize: into the quantized layers, kept quantized), and verified by
verifier/quantized.py against the unmerged model on the same quantized base (quant/formats.py: the budgets)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.io import loading
from safe_merge.io.model_dir import write_quantized_model
from safe_merge.merger.backends import peft as backend_peft
from safe_merge.merger.backends.peft import PeftBackend
from safe_merge.merger.job import Job
from safe_merge.quant.formats import (
    float_twin,
)
from safe_merge.verifier.quantized import verify
from safe_merge.verifier.verdict import Verification


def merge(base_dir: Path, adapter: AdapterFiles, policy: str, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    """dequantize: PEFT's merge into the float twin; requantize: PEFT's merge into the quantized layers."""
    model = loading.load_model(base_dir, dtype)
    if policy == "dequantize":
        model = float_twin(model, dtype)
    merged, notes = backend_peft.merge_model(model, adapter)
    # transformers 5 would reverse the conversions it applied when loading the quantized checkpoint, and has no
    # reverse for some; the layers already hold the quantized form it saves
    vars(merged).pop("_weight_conversions", None)
    return merged, notes


class QuantizedBackend(PeftBackend):
    """PEFT's merge on a base whose config declares a quantization method (answers to --backend peft)."""

    name = "peft"

    @classmethod
    def offer(cls, job: Job, adapter: AdapterFiles) -> QuantizedBackend | list[str]:
        if job.quant is None:
            return ["the base is not quantized"]
        if job.quant.stored is not None:
            return [f"{job.quant.method} is read as stored and merged tensor by tensor by the stream backend"]
        return cls(job, adapter)

    def merge(self) -> None:
        self.model, self.notes = merge(self.job.base_dir, self.adapter, self.job.policy, self.job.dtype)

    def write_files(self, stage: Path, size: str) -> tuple[list[str], list[str]]:
        if self.job.policy != "requantize":  # a float model: the PEFT backend's own writer
            return super().write_files(stage, size)
        return write_quantized_model(self.model, stage, self.job.base_dir, self.adapter.path, size), []

    def verify(self, stage: Path) -> Verification:
        job = self.job
        self.verification = verify(job.base_dir, self.adapter.path, stage, job.quant, job.policy, job.dtype)
        return self.verification

    def report(self) -> dict:
        return {"quantization": self.verification.quantized.report()}

    def checks(self) -> list[str]:
        return [
            f"quantized base ({self.job.quant.describe()}), merged by {self.job.policy}: weights against "
            "dequant(W)+ΔW, outputs against the unmerged model on the quantized base, within the method's budget"
        ]
