"""The stream backend as the pipeline sees it: offered a job, it takes it only where its arithmetic is PEFT's
(the installed release, every layer kind, ties it can name), and says why not otherwise."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from packaging.version import Version

from safe_merge.compat.adapter_files import AdapterFiles
from safe_merge.compat.history import History
from safe_merge.io.buffers import Buffers
from safe_merge.io.journal import merge_key
from safe_merge.merger.backends.base import WEIGHT_CHECKS
from safe_merge.merger.backends.stream import parallel
from safe_merge.merger.backends.stream import verify as stream_verify
from safe_merge.merger.backends.stream import write as stream_write
from safe_merge.merger.backends.stream.layout import might_tie, vocab_rows
from safe_merge.merger.job import Job
from safe_merge.verifier.delta import LayerKind
from safe_merge.verifier.ledger import Status
from safe_merge.verifier.outputs import available_memory, resident_memory
from safe_merge.verifier.replication import layer_sources
from safe_merge.verifier.verdict import Verification, adapter_precision


class StreamBackend:
    """Tensor by tensor from the base's shards into new shards; memory bounded by the largest tensor."""

    name = "stream"
    chosen_because = "the stream backend handles every part of it"

    def __init__(self, job: Job, adapter: AdapterFiles, view: stream_write.StreamMerge):
        self.job, self.adapter, self.view = job, adapter, view
        self.checks_as_written = stream_verify.TensorChecks(view)
        self.written: stream_write.Written | None = None
        self.notes: list[str] = []
        self.outputs = stream_verify.plan_outputs(view, job.request.check_outputs)

    @classmethod
    def offer(cls, job: Job, adapter: AdapterFiles) -> StreamBackend | list[str]:
        early = blockers(job, None)
        if early:
            return early
        view = stream_write.prepare(
            job.base_dir,
            adapter,
            job.dtype,
            adapter_precision(job.dtype),
            job.request.rounding,
            job.policy,
            job.request.device,
        )
        found = blockers(job, view)
        if found and view.stored is not None:  # no other backend reads a stored format: say so, not "use peft"
            stored = f"; the base is stored as {job.quant.method}, which only the stream backend reads"
            return [f"{why.replace(' is merged by the PEFT backend', ' is not merged yet')}{stored}" for why in found]
        return found or cls(job, adapter, view)

    def builds_models(self) -> bool:
        """Only the output check builds models (the merged one, and the unmerged PeftModel on the base)."""
        return self.outputs.runs

    def merge(self) -> None:
        """Nothing happens before writing: each tensor is merged as it is written."""

    def workers(self) -> int:
        """--workers, or auto: by the cores, the memory each worker needs and the output's size."""
        declared = stream_write.declare(self.view, self.job.request.max_shard_size)
        total = sum(s.nbytes for slots in declared.values() for s in slots)
        return parallel.choose_workers(self.job.request.workers, len(declared), total, self.working, available_memory())

    @functools.cached_property
    def working(self) -> int:
        """The memory one process merging shards holds beyond its interpreter (write.working_set)."""
        return stream_write.working_set(self.view, self.adapter.weight_file.stat().st_size)

    def resume_key(self) -> str:
        """What this merge is made from (io/journal.py): an interrupted run with the same key is continued."""
        request = self.job.request
        options = {
            "backend": self.name,
            "dtype": str(self.view.dtype),
            "max_shard_size": request.max_shard_size,
            "rounding": request.rounding,
            "quantized": self.view.policy,
        }
        return merge_key(self.job.base_dir, self.adapter.path, options)

    def write(self, stage: Path) -> list[str]:
        ray = self.job.request.ray
        workers = self.job.request.workers if ray else self.workers()
        share = workers or os.cpu_count() or 1
        inputs = parallel.Inputs(
            self.job.base_dir,
            self.adapter.path,
            self.view.dtype,
            self.view.factor_dtype,
            self.view.rounding,
            self.view.policy,
            str(self.view.device),
            check=True,
            threads=max(1, (os.cpu_count() or 1) // share),
        )
        self.written = stream_write.write(
            self.view,
            stage,
            self.job.base_dir,
            self.adapter.path,
            self.job.request.max_shard_size,
            self.checks_as_written,
            inputs,
            workers,
            ray,
        )
        self.notes = self.written.notes
        return self.written.files

    def verify(self, stage: Path) -> Verification:
        assert self.written is not None, "write() first"
        self.view.release_buffers()  # before the output check loads models: --plan counts one or the other
        self.checks_as_written.buffers = Buffers()
        with self.written.timing("verify"):
            return stream_verify.verify(
                self.view,
                stage,
                self.job.base_dir,
                self.adapter.path,
                self.outputs,
                self.checks_as_written,
            )

    def report(self) -> dict:
        assert self.written is not None, "write() first"
        written = self.written
        stream = {"tensors": written.counts, "seconds": written.seconds, "workers": written.workers}
        return {"stream": {**stream, "resumed_shards": written.resumed}}

    def estimate_peak_memory(self, free: int) -> dict:
        """The peak resident set of the merge's processes on this machine: what this one holds now (the
        interpreter, torch), then the larger of the merge and, when it runs, what the output check adds (the
        merge's buffers are released before it). The merge is this process's working set (write.working_set), or
        with local workers each worker's: an interpreter and that working set. Ray's tasks run on the cluster's
        nodes and Ray's own processes are not counted: ``per_worker_bytes`` says what each task holds."""
        outputs = stream_verify.plan_outputs(self.view, self.job.request.check_outputs, free)
        ray = self.job.request.ray
        workers = 1 if ray else self.workers()
        per_worker = parallel.WORKER_OVERHEAD + self.working
        merge = self.working if workers == 1 else workers * per_worker
        check = outputs.need + outputs.twin
        estimate = {
            "bytes": resident_memory() + (max(merge, check) if outputs.runs else merge),
            "float64_noise_twin": outputs.runs and bool(outputs.twin),
            "output_check": f"{'runs' if outputs.runs else 'skipped'} ({outputs.mode})",
        }
        if ray or workers > 1:
            estimate["per_worker_bytes"] = per_worker
        return estimate

    def checks(self) -> list[str]:
        return [WEIGHT_CHECKS]


def blockers(job: Job, view: stream_write.StreamMerge | None) -> list[str]:
    """Why the stream backend cannot take this merge (empty: it can); ``view`` None asks only what the job says."""
    if job.combination is not None:
        return ["several adapters are combined with PEFT's add_weighted_adapter"]
    if job.quant is not None and job.quant.stored is None:
        return ["the base is quantized; its layers are dequantized and requantized by PEFT"]
    release = job.peft_release
    first = History.load().boundary("stream_backend_matches")
    if Version(release) < first:
        return [f"the installed PEFT {release} merges differently from the stream backend (it matches from {first})"]
    if any(layer_sources(files.config) for files in job.adapter_files):
        return ["layer_replication deepens the layer stack: the PEFT backend writes each copy with its own weights"]
    if getattr(job.base_config, "auto_map", None):
        return ["the model's code is not part of transformers (auto_map): its layer classes are unknown unbuilt"]
    if view is None:
        return []
    out = [f"{m}: {why}" for m, why in view.layout.problems.items()]
    if view.layout.tied is None and might_tie(view.config):
        tieable = sorted(set(vocab_rows(view.checkpoint, view.config)) & view.touched)
        if tieable:
            out.append(
                f"{tieable[0]}: the config leaves weight tying on and the adapter changes this tensor, but which "
                "output weight shares it is only known to the built model"
            )
    unmatched = view.ledger.by_status(Status.UNMATCHED)
    if any(files.config.get("target_parameters") for files in job.adapter_files):
        # a stack the checkpoint stores fused under the parameter's own name (gpt-oss's experts.down_proj, in
        # transformers 4 matched as a module) is not one this backend splits and merges: only .weight/.bias are
        stored = view.checkpoint.tensors
        stacked = [e for e in view.ledger.entries if e.param in stored and not e.param.endswith((".weight", ".bias"))]
        # a stack stored whole is merged here as PEFT 0.19 on merges it, when the ledger took it for a stack
        as_stacks = all((lora := view.ledger.modules.get(e.param)) is not None and lora.kind.experts for e in stacked)
        if stacked and (not as_stacks or History.load().affected("param_wrapper_assumes_in_out", release)):
            unmatched = unmatched or stacked
        if unmatched:
            return [
                f"{unmatched[0].key}: LoRA on MoE expert parameters (target_parameters) is merged by the PEFT backend"
            ]
    if view.ledger.token_rows:
        out.append(f"{sorted(view.ledger.token_rows)[0]}: trainable tokens are merged by the PEFT backend")
    for entry in view.ledger.entries:
        if entry.status in (Status.UNMATCHED, Status.UNVERIFIED):
            out.append(f"{entry.key}: {entry.reason}")
    float32_bias = Version(release) < History.load().boundary("delta_rounded_before_add")
    for module, lora in view.ledger.modules.items():
        if lora.magnitude is not None and lora.kind is LayerKind.EMBEDDING:
            out.append(f"{module}: DoRA on an embedding is merged by the PEFT backend")
        if lora.bias is not None and float32_bias and view.dtype in (torch.float16, torch.bfloat16):
            out.append(f"{module}: PEFT {release} leaves a merged lora_B bias in float32; the PEFT backend keeps that")
    return out
