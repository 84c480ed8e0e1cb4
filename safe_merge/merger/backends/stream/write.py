"""The stream backend's merge: one output tensor at a time, from the base's shards straight into new shards.

Untouched tensors in the output dtype are copied file to file by the kernel; a targeted weight is read, merged
with PEFT's arithmetic (stream/arith.py) and written, then dropped. The output mirrors the base's shards (same
file names, same tensors in each) unless a shard size is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safe_merge.compat.adapter_files import AdapterFiles, return_pages
from safe_merge.compat.expert_stacks import stored_in_out
from safe_merge.io.buffers import Buffers
from safe_merge.io.checkpoint import Checkpoint, TensorInfo
from safe_merge.io.journal import Journal
from safe_merge.io.model_dir import carry_files
from safe_merge.io.shards import ShardWriter, Slot, copies_at, parse_size, plan_shards, write_index
from safe_merge.merger.backends.stream import arith, experts, parallel, requantize
from safe_merge.merger.backends.stream.layout import BaseView, Layout, LedgerView, infer_layout
from safe_merge.quant.stored.codec import Group
from safe_merge.quant.stored.view import StoredView, open_checkpoint
from safe_merge.verifier.delta import LayerKind
from safe_merge.verifier.layer_kinds import expert_kind
from safe_merge.verifier.ledger import Ledger, build_ledger
from safe_merge.verifier.systematic import Drift
from safe_merge.verifier.weights import TensorResult, touched_params


@dataclass
class StreamMerge:
    """The base as the stream backend sees it, with the adapter accounted for."""

    checkpoint: Checkpoint
    layout: Layout
    ledger: Ledger
    config: dict
    dtype: torch.dtype  # output dtype of every floating tensor
    factor_dtype: torch.dtype  # the precision the merging PEFT holds LoRA factors in
    rounding: str = "default"  # whose rounding the merge reproduces (compat/rounding.py)
    policy: str = "dequantize"  # a quantized base read as stored: written as floats, or requantized in its format
    adapter_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # released as each tensor is done
    buffers: Buffers = field(default_factory=Buffers)  # the large temporaries, reused tensor after tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the merge's arithmetic runs
    _device_buffers: Buffers | None = None

    def release_buffers(self) -> None:
        """Give back the buffers the merge kept from tensor to tensor (the merge is done)."""
        self.buffers, self._device_buffers = Buffers(), None

    def device_buffers(self) -> Buffers:
        if self._device_buffers is None:
            self._device_buffers = Buffers(self.device)
        return self._device_buffers

    def return_pages(self, name: str) -> None:
        """Give back the memory of the adapter tensors that went into ``name`` (mapped files only)."""
        return_pages(self.adapter_tensors, [e.key for e in self.ledger.entries if e.param == name])

    @property
    def stored(self) -> StoredView | None:
        """The base's quantized checkpoint as stored, when it is one (quant/stored/)."""
        return self.checkpoint if isinstance(self.checkpoint, StoredView) else None

    @property
    def requantize(self) -> bool:
        """Write the base's format back: quantized weights the adapter changes are quantized again (fresh scales),
        every other stored tensor is copied as it is."""
        return self.stored is not None and self.policy == "requantize"

    def part(self, name: str) -> Group | None:
        """The quantized weight a stored tensor is part of, when the output keeps the base's format."""
        if not self.requantize or name not in self.stored.part_of:
            return None
        return self.stored.groups[self.stored.part_of[name]]

    @functools.cached_property
    def touched(self) -> frozenset[str]:
        return frozenset(touched_params(self.ledger))

    @property
    def untie(self) -> bool:
        """A tied pair one side of which the adapter changes is written as two tensors."""
        return self.layout.tied is not None and bool(set(self.layout.tied) & self.touched)

    def written_names(self) -> set[str]:
        """Every tensor the merged checkpoint holds: the base's, and an untied output embedding."""
        names = set(self.stored.stored.tensors if self.requantize else self.checkpoint.tensors)
        return names | ({self.layout.tied[0]} if self.untie else set())

    def output_names(self) -> dict[str, list[str]]:
        """Output tensors per base shard file name, in the base's order (an untied output embedding follows the
        tensor it shared)."""
        out: dict[str, list[str]] = {}
        order = self.stored.stored.order if self.requantize else self.checkpoint.order
        for shard, names in order.items():
            row = out.setdefault(shard.name.replace(".bin", ".safetensors").replace("pytorch_model", "model"), [])
            for name in names:
                row.append(name)
                if self.untie and name == self.layout.tied[1]:
                    row.append(self.layout.tied[0])
        return out

    def out_dtype(self, name: str) -> torch.dtype:
        if self.part(name) is not None:
            return self.stored.stored.tensors[name].dtype
        info = self.checkpoint.tensors[BaseView(self.checkpoint, self.layout).source(name)]
        return self.dtype if info.floating else info.dtype

    def shape(self, name: str) -> tuple[int, ...]:
        if self.part(name) is not None:
            return self.stored.stored.tensors[name].shape
        return self.checkpoint.tensors[BaseView(self.checkpoint, self.layout).source(name)].shape

    def source_info(self, name: str) -> TensorInfo:
        """Where an output tensor's bytes are in the base, when it is copied as stored."""
        if self.part(name) is not None:
            return self.stored.stored.tensors[name]
        return self.checkpoint.tensors[BaseView(self.checkpoint, self.layout).source(name)]


@dataclass
class Written:
    files: list[str]
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # merged / replaced / copied / cast tensors
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase: read, merge, write, copy
    workers: int = 1  # processes that wrote the shards (their phase seconds are summed)
    resumed: int = 0  # shards an interrupted run had completed (io/journal.py), kept

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - started, 3)


def prepare(
    base_dir: Path,
    adapter: AdapterFiles,
    dtype: torch.dtype,
    factor_dtype: torch.dtype,
    rounding: str = "default",
    policy: str = "dequantize",
    device: str = "cpu",
) -> StreamMerge:
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    checkpoint = open_checkpoint(base_dir, config, dtype)
    layout = infer_layout(adapter, checkpoint, config)
    stacks = experts.find_stacks(checkpoint, str(config.get("model_type") or "")) if _on_params(adapter) else {}
    kinds = {**layout.kinds, **dict.fromkeys(stacks, expert_kind(transposed=False))}  # pieces are [out, in]
    if _on_params(adapter):  # stacks stored whole, under the parameter's own name (gpt-oss)
        model_type = str(config.get("model_type") or "")
        whole = [n for n, i in checkpoint.tensors.items() if len(i.shape) == 3 and i.floating and n not in stacks]
        kinds.update(dict.fromkeys(whole, expert_kind(transposed=stored_in_out(model_type))))
    ledger = build_ledger(adapter, LedgerView(checkpoint, layout, stacks), kinds, factor_dtype, precision=None)
    experts.split(ledger, stacks)  # a LoRA on a stack stored per expert: a plain Linear LoRA on each piece
    merge = StreamMerge(checkpoint, layout, ledger, config, dtype, factor_dtype, rounding, policy, adapter.tensors)
    merge.device = torch.device(device)
    return merge


def _on_params(adapter: AdapterFiles) -> bool:
    return bool(adapter.config.get("target_parameters"))


Check = Callable[[str, torch.Tensor, torch.Tensor], None]  # (name, value before the merge, as written)

BLOCK_TEMPORARIES = 2**24  # the row blocks the merge and its check work in (a few MiB each), and numpy's


def working_set(prep: StreamMerge, adapter_bytes: int) -> int:
    """The memory a merge holds beyond what the process started with: the adapter, and the buffers kept from
    tensor to tensor, each at the size of the largest tensor it serves (io/buffers.py): two reads (one is read
    ahead), the merge and its read-back, the product and the verifier's replayed product (float32). A tensor read
    in another dtype is converted into memory of its own; one checked against its whole float64 merge (not a plain
    Linear weight) holds five float64 copies; a stored format's codec works on float32 copies."""
    item = torch.tensor([], dtype=prep.dtype).element_size()
    base = BaseView(prep.checkpoint, prep.layout)
    read = merged = whole = 0
    for name in (n for names in prep.output_names().values() for n in names):
        if prep.part(name) is not None or not _needs_read(prep, base, name):
            continue
        info = prep.checkpoint.tensors[base.source(name)]
        numel = math.prod(info.shape)
        size = numel * (item if info.dtype == prep.dtype else item + torch.tensor([], dtype=info.dtype).element_size())
        if prep.stored is not None:
            size += numel * 4
        read = max(read, size)
        if name in prep.touched:
            merged = max(merged, numel * (item + 2 * 4))
            lora = prep.ledger.modules.get(name.removesuffix(".weight"))
            if lora is None or lora.kind is not LayerKind.LINEAR or lora.magnitude is not None:
                whole = max(whole, numel * 5 * 8)
    return adapter_bytes + 2 * read + merged + whole + BLOCK_TEMPORARIES


def declare(prep: StreamMerge, max_shard_size: str | None) -> dict[str, list[Slot]]:
    """The output shards and the tensors each holds, in order: the base's shards, or shards of at most
    ``max_shard_size``."""
    declared = {
        file_name: [Slot(n, prep.out_dtype(n), prep.shape(n)) for n in names]
        for file_name, names in prep.output_names().items()
    }
    if max_shard_size is not None:
        declared = plan_shards([s for slots in declared.values() for s in slots], parse_size(max_shard_size))
    return declared


def write(
    prep: StreamMerge,
    out: Path,
    base_dir: Path,
    adapter_dir: Path,
    max_shard_size: str | None,
    check: Check | None = None,
    parallel_inputs: parallel.Inputs | None = None,
    workers: int | None = 1,
    ray: str | None = None,
) -> Written:
    """Write the merged model into ``out`` (an empty staging directory). ``check`` sees every merged or replaced
    tensor as soon as it is on disk, read back, with the value it started from (so nothing is read twice). With
    ``workers`` > 1 the shards are shared among that many processes (stream/parallel.py), each checking its own."""
    declared = declare(prep, max_shard_size)
    written = Written([])
    journal = Journal(out)
    if journal.active:  # shards an interrupted run completed are kept, with what was checked in them
        done = journal.done()
        for path in out.iterdir():
            if path.name not in done:
                path.unlink()  # a shard the interrupted run had not finished
        for record in done.values():
            if check is not None:
                check.merge([restore_result(r) for r in record["results"]], set(record["seen"]))
            for key, count in record["counts"].items():
                written.counts[key] = written.counts.get(key, 0) + count
        written.resumed = len(done)
        declared = {name: slots for name, slots in declared.items() if name not in done}
    if declared and parallel_inputs is not None and (ray is not None or (workers > 1 and len(declared) > 1)):
        with written.timing("workers"):
            shares = (
                parallel.run_on_ray(parallel_inputs, out, declared, workers, ray)
                if ray is not None
                else parallel.run(parallel_inputs, out, declared, workers)
            )
            for share in shares:
                for key, count in share.counts.items():
                    written.counts[key] = written.counts.get(key, 0) + count
                for phase, seconds in share.seconds.items():  # summed over workers: CPU-side seconds
                    written.seconds[phase] = round(written.seconds.get(phase, 0.0) + seconds, 3)
                if check is not None:
                    check.merge(share.results, share.seen)
        written.workers = len(shares)
    elif declared:
        write_shards(prep, out, declared, written, check)
    declared = declare(prep, max_shard_size)  # every shard, for the index
    write_index(out, declared)
    (out / "config.json").write_text(json.dumps(_config(prep), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    carry_files(out, base_dir, adapter_dir)
    if prep.untie:
        output, shared = prep.layout.tied
        written.notes.append(
            f"untied {output} from {shared}, so the merged model keeps the adapter's meaning (the merge would "
            "otherwise change the tied side too)"
        )
    written.files = sorted(p.name for p in out.iterdir())
    return written


def write_shards(
    prep: StreamMerge, out: Path, declared: dict[str, list[Slot]], written: Written, check: Check | None
) -> None:
    """Write ``declared`` shards into ``out``, a tensor at a time, each checked as soon as it is on disk."""
    base = BaseView(prep.checkpoint, prep.layout)
    order = [slot.name for slots in declared.values() for slot in slots]
    parts = requantize.Parts(prep, check)
    journal = Journal(out)
    before = _progress(written, check)
    recorded: list[Future] = []
    # a tensor is read while the one before it is merged; a shard is made durable and journaled while the next
    # one is written (fsync waits on the disk, not the CPU)
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as recorder:
        reads: dict[str, Future] = {}
        submitted = [0]

        def prefetch(i: int) -> None:
            for name in order[i : i + 2]:  # this tensor and the next, into alternate buffers
                if name not in reads and _needs_read(prep, base, name):
                    role = f"read-{submitted[0] % 2}"
                    submitted[0] += 1
                    reads[name] = reader.submit(_start_value, prep, base, name, role)

        position = 0
        for file_name, slots in declared.items():
            data_at = copies_at(slots, _copied_from(prep, base, slots))
            writer = ShardWriter(out / file_name, slots, {"format": "pt"}, data_at)
            try:
                for slot in slots:
                    prefetch(position)
                    position += 1
                    if prep.part(slot.name) is not None:
                        parts.emit(writer, slot, written)
                        continue
                    _emit(prep, writer, slot, written, reads.pop(slot.name, None), check)
            except BaseException:
                writer.abort()
                for future in reads.values():
                    future.cancel()
                raise
            writer.close()
            if journal.active:
                recorded.append(recorder.submit(journal.record, file_name, _checked_since(before, written, check)))
            before = _progress(written, check)
    for record in recorded:
        record.result()  # a shard that could not be made durable fails the merge


def _copied_from(prep: StreamMerge, base: BaseView, slots: list[Slot]) -> dict[str, int]:
    """The slots copied byte for byte from the base (unchanged, in their stored dtype), with their offsets in
    their base files: the shard is laid out so that the filesystem can share their blocks (shards.copies_at)."""
    out = {}
    for slot in slots:
        group = prep.part(slot.name)
        copied = group.name not in prep.touched if group is not None else not _needs_read(prep, base, slot.name)
        if copied:
            out[slot.name] = prep.source_info(slot.name).offset
    return out


def _progress(written: Written, check: Check | None) -> tuple[dict, int, frozenset]:
    """Where the counts and the checks stand: what a shard added is recorded in the journal."""
    if check is None or not hasattr(check, "results"):
        return dict(written.counts), 0, frozenset()
    return dict(written.counts), len(check.results.tensors), frozenset(check.seen)


def _checked_since(before: tuple, written: Written, check: Check | None) -> dict:
    counts, results, seen = before
    now = _progress(written, check)
    return {
        "counts": {k: v - counts.get(k, 0) for k, v in now[0].items() if v != counts.get(k, 0)},
        "results": check.results.tensors[results:] if now[1] else [],
        "seen": sorted(now[2] - seen),
    }


def restore_result(record: dict) -> TensorResult:
    """A TensorResult as the journal holds it."""
    drift = record.get("drift")
    return TensorResult(**{**record, "drift": Drift(**drift) if drift else None})


def _needs_read(prep: StreamMerge, base: BaseView, name: str) -> bool:
    """Untouched tensors already in the output dtype are copied by the kernel, unread."""
    if prep.part(name) is not None:
        return False  # a part of a quantized weight: requantize.Parts reads what it needs
    info = prep.checkpoint.tensors[base.source(name)]
    return name in prep.touched or info.dtype != prep.out_dtype(name) or info.offset < 0


def _start_value(prep: StreamMerge, base: BaseView, name: str, role: str) -> tuple[torch.Tensor, float]:
    """The value a tensor starts the merge from, in the output dtype (a saved copy replaces the base's), and the
    seconds it took to read. A base tensor already in the output dtype is read into the ``role`` buffer."""
    started = time.perf_counter()
    saved = prep.ledger.replacements.get(name)
    dtype = prep.out_dtype(name)
    info = prep.checkpoint.tensors[base.source(name)]
    if saved is not None:
        value = saved.to(dtype)
    elif info.dtype == dtype:
        value = prep.checkpoint.read(info.name, out=prep.buffers.take(role, info.shape, dtype))
    else:
        value = base[name].to(dtype)
    return value, time.perf_counter() - started


def _emit(
    prep: StreamMerge, writer: ShardWriter, slot: Slot, written: Written, read: Future | None, check: Check | None
) -> None:
    name = slot.name
    counts = written.counts
    if read is None:
        info = prep.source_info(name)
        with written.timing("copy"):
            writer.copy(name, slot.dtype, slot.shape, info.file, info.offset)
        counts["copied"] = counts.get("copied", 0) + 1
        return
    with written.timing("wait for read"):
        start, seconds = read.result()
    written.seconds["read"] = round(written.seconds.get("read", 0.0) + seconds, 3)
    value = start
    if name in prep.touched:
        with written.timing("merge"):
            value = merged_tensor(prep, name, start)
        kind = "replaced" if name in prep.ledger.replacements else "merged"
    else:
        kind = "cast"
    counts[kind] = counts.get(kind, 0) + 1
    with written.timing("write"):
        writer.write(name, value)
    del value
    if check is not None and name in prep.touched:
        with written.timing("verify"):
            # read back into the merge's buffer: its contents are on disk now
            check(name, start, writer.read_back(name, prep.buffers.take("merged", (slot.nbytes,), torch.uint8)))
        prep.return_pages(name)


def merged_tensor(prep: StreamMerge, name: str, start: torch.Tensor) -> torch.Tensor:
    """One touched tensor as PEFT's merge leaves it, from its starting value (the base's, or a saved copy's) in
    the output dtype."""
    stack = prep.ledger.modules.get(name)
    if stack is not None and stack.kind.experts:  # a fused stack the checkpoint stores whole (gpt-oss)
        return arith.merge_stack(start, stack, prep.factor_dtype)
    module, _, leaf = name.rpartition(".")
    lora = prep.ledger.modules.get(module)
    if lora is None or leaf not in ("weight", "bias") or (leaf == "bias" and lora.bias is None):
        return start
    if leaf == "bias":
        return arith.merge_bias(start, lora, prep.factor_dtype, start.dtype)
    if prep.device.type != "cpu":  # --device: the arithmetic there, the result back for writing and checking
        on = prep.device_buffers()
        merged = arith.merge_weight(start.to(prep.device), lora.on(prep.device), prep.factor_dtype, buffers=on,
                                    rounding=prep.rounding)  # fmt: skip
        return merged.to("cpu")
    # NaN or Inf fail the verifier, naming the tensor
    return arith.merge_weight(start, lora, prep.factor_dtype, buffers=prep.buffers, rounding=prep.rounding)


def _config(prep: StreamMerge) -> dict:
    """The base's config with what the merge changed: the dtype, and ties broken."""
    config = json.loads(json.dumps(prep.config))
    dtype = str(prep.dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype
    if prep.stored is not None and not prep.requantize:  # written as a float model
        config.pop("quantization_config", None)
    if prep.untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    return config
