"""The verifier's defect corpus: a correct merge of a tiny model, and each defect written into a copy of it.

A case is a tiny base (float32 on disk) and an adapter with small updates (each delta a twentieth of its weight's
spread, so a scale error hides inside every element's tolerance in half precision), merged by safe-merge into a
sharded checkpoint in one dtype. ``CORRECT`` rewrites the merged weights as another correct arithmetic would
have written them; ``DEFECTS`` writes one defect each. Every rewrite starts from the exact merge the adapter
defines (computed here from the ledger, in float64), not from the merged bits, so a defect is what a wrong merge
would really have written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safe_merge.compat.adapter_files import load_adapter
from safe_merge.demo import build_tokenizer
from safe_merge.io import loading
from safe_merge.merger.pipeline import MergeRequest, merge_command
from safe_merge.verifier.delta import ModuleLora, merged_weight
from safe_merge.verifier.layer_kinds import layer_kinds
from safe_merge.verifier.ledger import build_ledger
from tests.helpers import materialize
from tests.strategies import TINY, Case

SHARD = "4KB"  # several shards, so the index is part of every case


@dataclass
class Built:
    arch: str
    base: Path
    adapter: Path
    merged: Path
    dtype: torch.dtype
    base_tensors: dict[str, torch.Tensor]  # as stored (float32)
    loras: dict[str, ModuleLora]  # by the weight each one merges into, float64
    tied: bool

    def start(self, name: str) -> torch.Tensor:
        """The tensor before the merge, in the merged dtype, as float64 (where every merge starts)."""
        return self.base_tensors[name].to(self.dtype).to(torch.float64)

    def exact(self, name: str, scale: float = 1.0, **changes) -> torch.Tensor:
        lora = dataclasses.replace(self.loras[name], scale=self.loras[name].scale * scale, **changes)
        return merged_weight(self.start(name), lora)

    def square(self) -> str:
        return next(n for n, lo in self.loras.items() if lo.b.shape[0] == lo.a.shape[1] and "embed" not in n)


ARCHS = {
    "llama": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "gpt2": {"target_modules": ["c_attn", "c_proj", "c_fc", "wte"], "fan_in_fan_out": True},
    "llama_dora": {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True},
}


def build(root: Path, arch: str, dtype: str) -> Built:
    lora = {"r": 8, "lora_alpha": 16, **ARCHS[arch]}
    model = "gpt2" if arch == "gpt2" else "llama"
    case = Case(model, TINY["two_layers"], model == "gpt2", lora, "float32", seed=11, delta_scale=0.05)
    base, adapter = materialize(case, root)
    build_tokenizer(base)
    out = root / "merged"
    report = merge_command(MergeRequest(str(base), [str(adapter)], out, dtype=dtype, max_shard_size=SHARD))
    assert report["status"] == "passed", report["problems"]
    tensors = load_file(str(base / "model.safetensors"))
    loaded = loading.load_model(base, torch.float32)
    ledger = build_ledger(load_adapter(adapter), loaded.state_dict(), layer_kinds(loaded))
    loras = {lora.target: lora for lora in ledger.modules.values()}
    return Built(arch, base, adapter, out, getattr(torch, dtype), tensors, loras, model == "gpt2")


# ---------------------------------------------------------------------------------------------------------------
# Rewriting a merged checkpoint


def shards(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(directory.glob("*.safetensors"))}


def rewrite(built: Built, dest: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the merged checkpoint with ``edit`` applied to all of its tensors (by name), each written back
    into the shard it came from."""
    shutil.copytree(built.merged, dest)
    files = shards(dest)
    everything = {name: t for tensors in files.values() for name, t in tensors.items()}
    edit(everything)
    for file, tensors in files.items():
        save_file({n: everything[n] for n in tensors if n in everything}, str(dest / file), metadata={"format": "pt"})
    return dest


def weights(built: Built, dest: Path, make: Callable[[str], torch.Tensor | None]) -> Path:
    """Every LoRA-merged weight replaced by ``make(name)`` (None keeps it), in the merged dtype."""

    def edit(tensors):
        for name in built.loras:
            value = make(name)
            if value is not None:
                tensors[name] = value.to(built.dtype).contiguous()

    return rewrite(built, dest, edit)


def one(built: Built, make: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor | None]:
    """``make`` for the first merged weight only (the one a defect names)."""
    first = first_name(built)
    return lambda name: make(name) if name == first else None


def first_name(built: Built) -> str:
    return next(n for n in sorted(built.loras) if "embed" not in n and "wte" not in n)


def json_edit(dest: Path, file: str, change: Callable[[dict], None]) -> None:
    path = dest / file
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# Correct merges, as other arithmetics write them


def _peft(built: Built, dest: Path, safe: bool) -> Path:
    model = loading.load_peft(loading.load_model(built.base, built.dtype), built.adapter)
    state = (model.merge_and_unload(safe_merge=True) if safe else model.merge_and_unload()).state_dict()
    return weights(built, dest, lambda name: state[name].clone())


def _delta_rounded_in_float64(built: Built, dest: Path) -> Path:
    """A correct arithmetic none of the replays knows: the float64 delta rounded to the dtype, then added."""
    return weights(
        built,
        dest,
        lambda n: (
            built.start(n).to(built.dtype) + (built.exact(n) - built.start(n)).to(built.dtype)
            if built.loras[n].magnitude is None
            else None
        ),
    )


CORRECT: dict[str, Callable[[Built, Path], Path]] = {
    "safe-merge": lambda built, dest: built.merged,
    "merge_and_unload()": lambda built, dest: _peft(built, dest, False),
    "merge_and_unload(safe_merge=True)": lambda built, dest: _peft(built, dest, True),
    "float64 rounded once": lambda built, dest: weights(
        built, dest, lambda n: merged_weight(built.base_tensors[n].double(), built.loras[n])
    ),
    "float64 delta rounded, then added": _delta_rounded_in_float64,
}


# ---------------------------------------------------------------------------------------------------------------
# Defects: (rewrite, what the verifier must name)


def _scaled(factor: float):
    return lambda built, dest: (weights(built, dest, lambda n: built.exact(n, factor)), "")


def _one_scaled(factor: float):
    return lambda built, dest: (weights(built, dest, one(built, lambda n: built.exact(n, factor))), first_name(built))


def _transposed(built: Built, dest: Path):
    name = built.square()
    start = built.start(name)
    return weights(built, dest, lambda n: start + (built.exact(n) - start).T if n == name else None), name


def _partial_rank(built: Built, dest: Path):
    name = first_name(built)
    lora = built.loras[name]
    keep = lora.a.shape[0] // 2
    a, b = lora.a.clone(), lora.b.clone()
    a[keep:] = 0
    b[:, keep:] = 0
    return weights(built, dest, one(built, lambda n: built.exact(n, a=a, b=b))), name


def _rslora_confused(built: Built, dest: Path):
    r = built.loras[first_name(built)].rank
    return _one_scaled(r**0.5)(built, dest)


def _block(built: Built, dest: Path, how: str):
    name = first_name(built)
    start = built.start(name)

    def make(n):
        change = built.exact(n) - start
        rows = slice(0, max(1, change.shape[0] // 4))
        if how == "flip":
            change[rows] = -change[rows]
        else:
            change[rows] = torch.roll(change[rows], 1, dims=0)
        return start + change

    return weights(built, dest, one(built, make)), name


def _element_off(built: Built, dest: Path):
    name = first_name(built)

    def edit(tensors):
        t = tensors[name].clone()
        ulp = float(torch.finfo(built.dtype).eps) * float(t[0, 0].abs().to(torch.float32))
        t[0, 0] = (t[0, 0].to(torch.float64) + 30 * ulp).to(built.dtype)
        tensors[name] = t

    return rewrite(built, dest, edit), name


def _untouched_changed(built: Built, dest: Path):
    name = next(n for n in sorted(built.base_tensors) if n.endswith(("norm.weight", "ln_1.weight")))

    def edit(tensors):
        tensors[name] = (tensors[name].to(torch.float64) * (1 + 1e-2)).to(tensors[name].dtype)

    return rewrite(built, dest, edit), name


def _nan(built: Built, dest: Path):
    name = first_name(built)

    def edit(tensors):
        t = tensors[name].clone()
        t[1, 1] = float("nan")
        tensors[name] = t

    return rewrite(built, dest, edit), name


def _not_applied(built: Built, dest: Path):
    return weights(built, dest, one(built, built.start)), first_name(built)


def _wrong_layer(built: Built, dest: Path):
    shape = built.base_tensors[first_name(built)].shape
    names = sorted(n for n in built.loras if built.base_tensors[n].shape == shape)
    name, other = names[0], names[1]
    delta = built.exact(name) - built.start(name)
    return weights(
        built, dest, lambda n: built.start(n) if n == name else built.exact(n) + delta if n == other else None
    ), name


def _dora_magnitude_ignored(built: Built, dest: Path):
    return weights(built, dest, lambda n: built.exact(n, magnitude=None)), ""


def _config(field: str, value):
    """A config field changed (inside rope_parameters where the config keeps it there, as transformers 5 does)."""

    def make(built: Built, dest: Path):
        shutil.copytree(built.merged, dest)

        def change(config):
            holder = config.get("rope_parameters") if field in (config.get("rope_parameters") or {}) else config
            holder[field] = value(holder)

        json_edit(dest, "config.json", change)
        return dest, field

    return make


def _generation(built: Built, dest: Path):
    shutil.copytree(built.merged, dest)
    json_edit(dest, "generation_config.json", lambda c: c.__setitem__("bos_token_id", 5))
    return dest, "generation_config.json bos_token_id"


def _tokenizer(built: Built, dest: Path):
    shutil.copytree(built.merged, dest)
    json_edit(dest, "tokenizer_config.json", lambda c: c.__setitem__("model_max_length", 7))
    return dest, "tokenizer_config.json"


def _outside_index(built: Built, dest: Path):
    def edit(tensors):
        tensors["stray.weight"] = torch.zeros(3)

    rewrite(built, dest, edit)
    first = sorted(dest.glob("*.safetensors"))[0]
    held = load_file(str(first))
    held["stray.weight"] = torch.zeros(3)
    save_file(held, str(first), metadata={"format": "pt"})
    return dest, "stray.weight"


def _index_wrong_shard(built: Built, dest: Path):
    shutil.copytree(built.merged, dest)
    name = first_name(built)
    files = sorted(p.name for p in dest.glob("*.safetensors"))

    def move(index):
        now = index["weight_map"][name]
        index["weight_map"][name] = next(f for f in files if f != now)

    json_edit(dest, "model.safetensors.index.json", move)
    return dest, name


def _missing(built: Built, dest: Path):
    name = first_name(built)
    rewrite(built, dest, lambda tensors: tensors.pop(name))
    json_edit(dest, "model.safetensors.index.json", lambda index: index["weight_map"].pop(name))
    return dest, name


def _tie_kept(built: Built, dest: Path):
    """An embedding LoRA merged into a tied embedding, the tie kept: the LM head moves with it."""
    rewrite(built, dest, lambda tensors: tensors.pop("lm_head.weight", None))
    json_edit(dest, "model.safetensors.index.json", lambda index: index["weight_map"].pop("lm_head.weight", None))
    json_edit(dest, "config.json", lambda c: c.__setitem__("tie_word_embeddings", True))
    return dest, "lm_head.weight"


Defect = Callable[[Built, Path], tuple[Path, str]]
DEFECTS: dict[str, Defect] = {
    "scale 1.02": _scaled(1.02),
    "scale 1.001": _scaled(1.001),
    "scale 0.999": _scaled(0.999),
    "one tensor at 1.02": _one_scaled(1.02),
    "not applied": _not_applied,
    "applied twice": _one_scaled(2.0),
    "sign flipped": _one_scaled(-1.0),
    "transposed": _transposed,
    "partial rank": _partial_rank,
    "alpha/sqrt(r) for alpha/r": _rslora_confused,
    "sign-flipped block": lambda b, d: _block(b, d, "flip"),
    "shifted block": lambda b, d: _block(b, d, "shift"),
    "an element 30 ulps off": _element_off,
    "untouched tensor changed": _untouched_changed,
    "NaN": _nan,
    "delta on the wrong layer": _wrong_layer,
    "config rope_theta x50": _config("rope_theta", lambda c: c.get("rope_theta", 10000.0) * 50),
    "config hidden_act": _config("hidden_act", lambda c: "gelu"),
    "generation_config edited": _generation,
    "tokenizer edited": _tokenizer,
    "tensor outside the index": _outside_index,
    "index names the wrong shard": _index_wrong_shard,
    "tensor missing": _missing,
}
GPT2_DEFECTS = {"tie kept": _tie_kept}
DORA_DEFECTS = {"DoRA magnitude ignored": _dora_magnitude_ignored}
