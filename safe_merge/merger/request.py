"""A merge request: what the user asked for, checked once when it is made and frozen afterwards.

The CLI and the Python API build it with keywords; everything after it (preflight, backends, the pipeline) may
trust its fields. The inputs themselves (directories, configs, adapters) are read by the preflight, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safe_merge.compat.rounding import ROUNDINGS
from safe_merge.errors import BadInput
from safe_merge.io.loading import DTYPES
from safe_merge.io.shards import parse_size
from safe_merge.quant.formats import POLICIES
from safe_merge.verifier.combination_types import Combination, parse_combination, require_weight_count

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
OUTPUT_CHECKS = ("auto", "always", "never")  # the stream backend's output check: when the models fit, always, never


def _one_of(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise BadInput(f"{option} {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class MergeRequest:
    """One `merge`: the base, the adapters in order, OUT, and every option, validated in ``__post_init__``."""

    base: str | None  # None: the base the first adapter names (adapter_config.json's base_model_name_or_path)
    adapters: tuple[str, ...]
    out: Path
    dtype: str = "auto"  # auto keeps the base's stored dtype
    backend: str = "auto"  # auto | peft | stream
    force: bool = False  # replace an existing OUT, only after success
    max_shard_size: str | None = None  # None: the stream backend mirrors the base's shards, PEFT uses 5GB
    plan: bool = False  # say what would happen; write nothing
    combination: Combination | None = None  # how to join several adapters (or weight one); cat for several
    quantized: str = "dequantize"  # a quantized base: dequantize | requantize | refuse (quant/formats.py)
    check_outputs: str = "auto"  # stream backend: auto (when the models fit in free memory) | always | never
    rounding: str = "default"  # whose bits: merge_and_unload()'s (default) or safe_merge=True's (compat/rounding.py)
    report: Path | None = None  # also write the JSON report here (published with OUT, never without it)
    revision: str | None = None  # hub adapters without their own @REVISION: this branch, tag or commit
    base_revision: str | None = None  # a hub base: this revision (default: the one adapter_config.json names, or main)
    card: bool = True  # write README.md, the model card, into OUT
    push_to_hub: str | None = None  # after a verified publish, upload OUT to this hub repo
    private: bool = False  # a repo --push-to-hub creates is private
    workers: int | None = None  # stream backend: processes writing shards at once (None: auto, by cores and memory)
    ray: str | None = None  # stream backend: run the workers as Ray tasks on this cluster address, or "local"
    device: str = (
        "cpu"  # stream backend: where the merge's arithmetic runs (cpu, cuda, cuda:N, auto); checks stay on CPU
    )

    def __post_init__(self) -> None:
        adapters = (self.adapters,) if isinstance(self.adapters, (str, Path)) else self.adapters
        object.__setattr__(self, "base", None if self.base is None else str(self.base))
        object.__setattr__(self, "adapters", tuple(str(a) for a in adapters))
        object.__setattr__(self, "out", Path(self.out))
        if self.report is not None:
            object.__setattr__(self, "report", Path(self.report))
        if not self.adapters:
            raise BadInput("no adapter given", hint="name at least one adapter directory after the base")
        _one_of("--dtype", self.dtype, DTYPE_CHOICES)
        from safe_merge.merger.backends import names  # the registry imports the job, which imports this module

        _one_of("--backend", self.backend, names())
        _one_of("--check-outputs", self.check_outputs, OUTPUT_CHECKS)
        _one_of("--quantized", self.quantized, POLICIES)
        _one_of("--rounding", self.rounding, tuple(ROUNDINGS))
        if self.max_shard_size is not None:
            parse_size(self.max_shard_size)
        if self.combination is None and len(self.adapters) > 1:
            object.__setattr__(self, "combination", parse_combination("cat", None, len(self.adapters)))
        if self.ray is not None and not ray_installed():
            raise BadInput(f"--ray {self.ray} needs Ray, which is not installed", hint="pip install 'safe-merge[ray]'")
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.workers is not None and self.workers < 1:
            raise BadInput(f"--workers {self.workers}: give a number of processes, 1 or more (or auto)")
        if self.private and self.push_to_hub is None:
            raise BadInput("--private applies to the repo --push-to-hub creates; pass --push-to-hub too")
        if self.combination is not None:
            require_weight_count(self.combination.weights, len(self.adapters))

    @property
    def torch_dtype(self):
        """The asked-for dtype as torch names it (None for auto: the preflight reads the base's)."""
        return None if self.dtype == "auto" else DTYPES[self.dtype]


def resolve_device(name: str) -> str:
    """--device as torch names it: auto is a CUDA device where torch sees one, else the CPU; a device torch
    cannot use here is refused."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInput(f"--device {name!r} is not a device torch knows", hint="use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: torch sees no CUDA device here", hint="use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {name}: safe-merge runs its arithmetic on cpu or cuda", hint="use cpu, cuda or auto")
    return str(device)


def ray_installed() -> bool:
    """Whether ``import ray`` would find it (without importing it: it is large)."""
    import importlib.util
    import sys

    if "ray" in sys.modules:
        return sys.modules["ray"] is not None
    return importlib.util.find_spec("ray") is not None


def combination_options(
    n_adapters: int,
    combination: str | None = None,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    svd_rank: int | None = None,
) -> Combination | None:
    """The Combination the options ask for: any option (or several adapters) makes one, cat by default."""
    if n_adapters <= 1 and all(x is None for x in (combination, weights, density, svd_rank)):
        return None
    return parse_combination(combination or "cat", weights, n_adapters, density, majority_sign, svd_rank)
