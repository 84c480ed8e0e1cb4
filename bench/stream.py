"""Benchmark: the stream backend against the PEFT path on a TinyLlama-shaped model, each in a fresh process.

Builds once (cached under the given directory) a Llama checkpoint of random bfloat16 weights in 3 safetensors
shards and an r=16 adapter on every projection with non-zero lora_B, written directly (no model is built, so the
larger shapes cost only disk). Then it times `safe-merge merge --backend stream` and the PEFT path
(from_pretrained + PeftModel.from_pretrained + merge_and_unload() + save_pretrained), prints wall seconds and peak
RSS of each (the largest process's, and the total over the process tree), checks that the two outputs are
bit-identical tensor by tensor (the stream backend writes the default merge_and_unload()'s bits), how many merged
tensors the verifier's exact tier matched, and runs the stream backend on a model 4x larger to show that its peak
RSS does not grow with the model. Beside them: the floor (copying the base's shards with torch imported),
--workers 1 and 2, Ray with 2 tasks on a local cluster (when Ray is installed), and a run killed at half its
shards and continued (its time against a full run's), with a 600 GB merge estimated from the measured rates.
Each stream run's peak RSS is set beside the peak `merge --plan` announced for it (the output check included).

    python bench/stream.py CACHE_DIR [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from safe_merge.io.checkpoint import Checkpoint
from safe_merge.io.shards import ShardWriter, Slot

SHAPES = {
    # TinyLlama 1.1B: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000, untied
    "tinyllama-1.1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    # a mid-size model: about 160M parameters (the verify benchmark's)
    "llama-160m": dict(hidden=768, intermediate=3072, layers=12, heads=12, kv_heads=12, vocab=32000),
    # four times the parameters with the same tensors: 97 layers instead of 22 (peak memory follows the largest
    # tensor, so a model grown in depth must not need more)
    "llama-4x": dict(hidden=2048, intermediate=5632, layers=97, heads=32, kv_heads=4, vocab=32000),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, SHARDS = 16, 32, 3

PEFT_PATH = """
import sys, torch, transformers
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size="1GB")
"""


def tensor_shapes(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    head = s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head
    out = [("model.embed_tokens.weight", (s["vocab"], s["hidden"]))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (s["hidden"],)),
            (p + "self_attn.q_proj.weight", (s["hidden"], s["hidden"])),
            (p + "self_attn.k_proj.weight", (kv, s["hidden"])),
            (p + "self_attn.v_proj.weight", (kv, s["hidden"])),
            (p + "self_attn.o_proj.weight", (s["hidden"], s["hidden"])),
            (p + "post_attention_layernorm.weight", (s["hidden"],)),
            (p + "mlp.gate_proj.weight", (s["intermediate"], s["hidden"])),
            (p + "mlp.up_proj.weight", (s["intermediate"], s["hidden"])),
            (p + "mlp.down_proj.weight", (s["hidden"], s["intermediate"])),
        ]
    return out + [("model.norm.weight", (s["hidden"],)), ("lm_head.weight", (s["vocab"], s["hidden"]))]


def build(root: Path, name: str) -> tuple[Path, Path]:
    """The base checkpoint and adapter for one shape, made once."""
    base, adapter = root / name / "base", root / name / "adapter"
    if (root / name / "done").is_file():
        return base, adapter
    shutil.rmtree(root / name, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    s = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    shapes = tensor_shapes(s)
    total = sum(math.prod(shape) for _, shape in shapes)
    shards, size, limit = [[]], 0, total / SHARDS
    for tensor_name, shape in shapes:
        if size >= limit * len(shards) and len(shards) < SHARDS:
            shards.append([])
        shards[-1].append((tensor_name, shape))
        size += math.prod(shape)
    weight_map = {}
    for i, group in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(base / file, [Slot(n, torch.bfloat16, sh) for n, sh in group], {"format": "pt"})
        for tensor_name, shape in group:
            if len(shape) == 1:
                value = torch.ones(shape, dtype=torch.bfloat16)
            else:
                value = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
            writer.write(tensor_name, value)
            weight_map[tensor_name] = file
        writer.close()
    nbytes = total * 2
    index = {"metadata": {"total_size": nbytes}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    _adapter(adapter, shapes, gen)
    (root / name / "done").write_text("")
    return base, adapter


def _adapter(adapter: Path, shapes, gen: torch.Generator) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(
        str(adapter)
    )
    tensors = {}
    for tensor_name, shape in shapes:
        module = tensor_name.removesuffix(".weight")
        if module.rpartition(".")[2] in TARGETS:
            out_f, in_f = shape
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn((RANK, in_f), generator=gen) / math.sqrt(in_f)
            tensors[f"{key}.lora_B.weight"] = torch.randn((out_f, RANK), generator=gen) * 0.01
    save_file(tensors, str(adapter / "adapter_model.safetensors"))


def warm(*dirs: Path) -> None:
    """Read the inputs once, so that every timed run finds them in the page cache (as after a download)."""
    for directory in dirs:
        for file in sorted(directory.iterdir()):
            with open(file, "rb") as fh:
                while fh.read(2**24):
                    pass


# Measures one command from a small process: a child's peak RSS as the kernel reports it includes the address
# space it was forked from, so the benchmark (which holds torch and large tensors) must not be that parent. The
# largest process's peak comes from the kernel (ru_maxrss of the command and, separately, of its descendants);
# the total over the process tree (the command, its workers, Ray's processes) is sampled every 20 ms from /proc.
MEASURE = """
import os, sys, time
def tree_rss(root):
    children, rss = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
                rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total
started = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
total = 0
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    total = max(total, tree_rss(pid))
    time.sleep(0.02)
import resource
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(time.monotonic() - started, max(usage.ru_maxrss * 1024, children), total, os.waitstatus_to_exitcode(status))
"""


def timed(cmd: list[str], inputs: tuple[Path, ...] = (), repeats: int = 3) -> tuple[float, float, int, float]:
    """(median wall seconds, peak RSS of the largest process in MiB, exit code, peak total RSS over the process
    tree in MiB) of ``repeats`` fresh processes. Before each, its inputs are read into the page cache and dirty
    pages left by earlier runs are flushed, so that no run pays for another's I/O."""
    walls, peak, code, total = [], 0.0, 0, 0.0
    for _ in range(repeats):
        warm(*inputs)
        os.sync()
        proc = subprocess.run([sys.executable, "-S", "-c", MEASURE, *cmd], capture_output=True, text=True)
        wall, rss, tree, status = proc.stdout.split()[-4:]
        walls.append(float(wall))
        peak, code = max(peak, int(rss) / 2**20), code or int(status)
        total = max(total, int(tree) / 2**20)
        if int(status):
            print(proc.stderr[-2000:], file=sys.stderr)
    return statistics.median(walls), peak, code, total


def identical(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names that differ in dtype, shape or any bit)."""
    left, right = Checkpoint(a), Checkpoint(b)
    names = sorted(set(left.tensors) | set(right.tensors))
    differ = [n for n in names if n not in left or n not in right]
    for name in names:
        if name in left and name in right:
            x, y = left.read(name), right.read(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                differ.append(name)
    return len(names), differ


def stream_cmd(base: Path, adapter: Path, out: Path, check_outputs: str, *extra: str) -> list[str]:
    script = Path(sys.executable).parent / "safe-merge"  # the installed command, as a user runs it
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "safe_merge"]
    merge = [*command, "merge", str(base), str(adapter), "-o", str(out)]
    report = ["--report", str(out.parent / f"{out.name}.report.json")]
    return merge + ["--backend", "stream", "--check-outputs", check_outputs, "--force", *report, *extra]


FLOOR = """
import shutil, sys, torch
from pathlib import Path
base, out = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(out, ignore_errors=True)
out.mkdir()
for shard in sorted(base.glob("*.safetensors")):
    shutil.copyfile(shard, out / shard.name)
"""
PARALLEL_SHARDS = "256MB"  # the 1.1B model in 9 output shards: enough to share among workers and to resume


def plan_bytes(cmd: list[str]) -> float:
    """The peak memory `merge --plan` announces for a command (MiB)."""
    planned = [*cmd, "--plan", "--json"]
    at = planned.index("--report")
    del planned[at : at + 2]  # the run's report is not overwritten by the plan's
    planned[planned.index("-o") + 1] += "-plan"  # --plan writes nothing, but OUT must not exist
    proc = subprocess.run(planned, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(proc.stdout)["peak_memory_estimate"]["bytes"] / 2**20


def row(label: str, size: int, wall: float, rss: float, code: int, total: float, plan: float | None = None) -> str:
    said = f"  (--plan said {plan:.0f} MiB)" if plan is not None else ""
    return (f"  {label:46s} {wall:7.2f} s  {rss:7.0f} MiB largest process, {total:7.0f} MiB all processes{said}"
            f"  {size / wall / 1e9:.2f} GB/s  exit {code}")  # fmt: skip


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def parallel_and_resume(base: Path, adapter: Path, work: Path) -> bool:
    """The floor (copying the base's shards, torch imported), the stream backend with 1 and 2 workers and as 2
    Ray tasks on a local cluster, and a run killed (SIGKILL) once half its shards are journaled, then continued;
    all with the output check off."""
    size = Checkpoint(base).total_bytes()
    floor = [sys.executable, "-c", FLOOR, str(base), str(work / "floor")]
    rows = [("floor: copy the base's shards + import torch", *timed(floor, (base, adapter)), None)]
    for workers in (1, 2):
        cmd = stream_cmd(base, adapter, work / f"w{workers}", "never", "--max-shard-size", PARALLEL_SHARDS,
                         "--workers", str(workers))  # fmt: skip
        rows.append((f"stream, {workers} worker(s), {PARALLEL_SHARDS} shards", *timed(cmd, (base, adapter)),
                     plan_bytes(cmd)))  # fmt: skip
    full = rows[1][1]
    killed = work / "resumed"
    cmd = stream_cmd(base, adapter, killed, "never", "--max-shard-size", PARALLEL_SHARDS, "--workers", "1")
    warm(base, adapter)
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = len(list((work / "w1").glob("*.safetensors")))
    while process.poll() is None:
        journals = list(work.glob(f".{killed.name}.*.journal"))
        if journals and len(list(journals[0].glob("*.safetensors.json"))) >= total // 2:
            process.kill()
            break
        time.sleep(0.01)
    process.wait()
    rows.append(("continue after a SIGKILL at half the shards", *timed(cmd, (base, adapter), 1), None))
    outputs = [work / "w2", killed]
    if ray_available():
        cmd = stream_cmd(base, adapter, work / "ray", "never", "--max-shard-size", PARALLEL_SHARDS, "--workers", "2",
                         "--ray", "local")  # fmt: skip
        rows.append(("Ray: 2 tasks on a local cluster (loopback)", *timed(cmd, (base, adapter), 1), None))
        outputs.append(work / "ray")
    for label, wall, rss, code, tree, plan in rows:
        print(row(label, size, wall, rss, code, tree, plan))
    over = within_plan(rows)
    floor = rows[0][1]
    print(f"  stream 1 worker / floor: {full / floor:.2f}x; 2 workers / 1: {rows[2][1] / full:.2f}x; "
          f"continued / full run: {rows[3][1] / full:.2f}x")  # fmt: skip
    resumed = json.loads((work / "resumed.report.json").read_text())["stream"]["resumed_shards"]
    same = all(identical(work / "w1", other)[1] == [] for other in outputs)
    names = "1 worker, 2 workers, the continued run" + (" and Ray" if len(outputs) == 3 else "")
    print(f"  continued from {resumed} of {total} shards; {names} bit-identical: {same}")
    print(f"  1 worker, phases: {phases(work / 'w1.report.json')}")
    rate, disk = size / full, size / floor
    one, floor_600 = 600e9 / rate / 60, 600e9 / disk / 60
    print(f"  600 GB on paper: one worker at {rate / 1e9:.2f} GB/s takes {one:.0f} min; the disk copies at "
          f"{disk / 1e9:.2f} GB/s, so no number of workers beats {floor_600:.0f} min here")  # fmt: skip
    return same and not over and not any(code for _, _, _, code, *_ in rows)


def within_plan(rows: list[tuple]) -> list[str]:
    """The runs whose peak RSS over all their processes exceeded what `merge --plan` said (printed)."""
    over = [label for label, _, _, _, tree, plan in rows if plan is not None and tree > plan]
    print(f"  peak RSS (all processes) within what --plan said: {not over}" + (f" (over: {over})" if over else ""))
    return over


def phases(report: Path) -> str:
    """The stream backend's own account of where the time went (last run)."""
    data = json.loads(report.read_text())
    parts = ", ".join(f"{k} {v:.2f}" for k, v in data["stream"]["seconds"].items())
    return f"in-process {data['seconds']:.2f} s: {parts}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache", type=Path)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    work = args.cache / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("wall: median of 3 fresh processes; peak RSS: the largest of the 3")
    started = time.monotonic()
    base, adapter = build(args.cache, "tinyllama-1.1b")
    size = Checkpoint(base).total_bytes()
    print(f"tinyllama-1.1b: built or found in {time.monotonic() - started:.1f} s")
    stream = stream_cmd(base, adapter, work / "stream", "never")
    rows = [("stream (weights checked, outputs not)", *timed(stream, (base, adapter)), plan_bytes(stream))]
    peft_cmd = [sys.executable, "-c", PEFT_PATH, str(base), str(adapter), str(work / "peft")]
    rows.append(("PEFT path (no verification)", *timed(peft_cmd, (base, adapter)), None))
    checked = stream_cmd(base, adapter, work / "stream-checked", "auto")
    rows.append(("stream, output check auto (runs here; once)", *timed(checked, (base, adapter), 1),
                 plan_bytes(checked)))  # fmt: skip
    for label, wall, rss, code, tree, plan in rows:
        print(row(label, size, wall, rss, code, tree, plan))
    stream_wall, stream_rss, peft_wall, peft_rss = rows[0][1], rows[0][2], rows[1][1], rows[1][2]
    print(f"  speed-up {peft_wall / stream_wall:.1f}x, memory {peft_rss / stream_rss:.1f}x less")
    print(f"  stream phases, {phases(work / 'stream.report.json')}")
    over = within_plan(rows)
    count, differ = identical(work / "stream", work / "peft")
    print(f"  bit-identical: {count - len(differ)} of {count} tensors" + (f"; differ: {differ[:5]}" if differ else ""))
    weights = json.loads((work / "stream.report.json").read_text())["verification"]["weights"]
    exact = sum(weights["exact"].values())
    only = weights["tolerance_only"]
    print(f"  exact tier: {exact} tensors exact ({weights['exact']}), {only} within tolerance only")
    failed = bool(differ) or bool(over) or any(code for _, _, _, code, *_ in rows)
    print("tinyllama-1.1b: workers, resume and Ray")
    failed = failed or not parallel_and_resume(base, adapter, work)
    if not args.skip_large:
        started = time.monotonic()
        big_base, big_adapter = build(args.cache, "llama-4x")
        big = Checkpoint(big_base).total_bytes()
        print(f"llama-4x: built or found in {time.monotonic() - started:.1f} s")
        cmd = stream_cmd(big_base, big_adapter, work / "stream-4x", "never")
        wall, rss, code, tree = timed(cmd, (big_base, big_adapter))
        print(row(f"stream on {big / 2**30:.1f} GiB", big, wall, rss, code, tree, plan_bytes(cmd)))
        print(f"  stream phases, {phases(work / 'stream-4x.report.json')}")
        print(f"  peak RSS 4x model / 1.1B model: {rss / stream_rss:.2f}")
        failed = failed or bool(code)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
