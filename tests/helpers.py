"""Turning a drawn case into files and models, the way a user's training run would leave them."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path

import peft
import torch

from safe_merge.compat.adapter_files import load_adapter
from safe_merge.io import loading
from safe_merge.merger.backends.peft import merge_model
from safe_merge.verifier.layer_kinds import layer_kinds
from safe_merge.verifier.verdict import Verification, verify_models
from tests.strategies import TINY, Case, build_base, fill_adapter, lora_config

FIXTURES = Path(__file__).parent / "fixtures"  # adapters and bases written by real PEFT releases (`nox -s fixtures`)


def run_cli(capsys, *args) -> tuple[int, dict | None, str]:
    """`safe-merge ARGS...` in this process: the exit code, the JSON report it printed on stdout (None without
    --json) and stderr. Arguments may be paths. The `cli` fixture (tests/conftest.py) binds capsys."""
    from safe_merge.cli import main

    argv = [str(a) for a in args]
    code = main(argv)
    captured = capsys.readouterr()
    report = json.loads(captured.out) if "--json" in argv and captured.out.strip() else None
    return code, report, captured.err


def digest(*dirs: Path) -> str:
    """A hash of every file under the given directories (relative path + bytes): "was anything modified?"."""
    h = hashlib.sha256()
    for d in dirs:
        for path in sorted(d.rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(d)).encode() + path.read_bytes())
    return h.hexdigest()


def merge_refused(tmp_path: Path, capsys, inputs: list[Path], extra: list[str], *needles: str, code: int = 2) -> str:
    """Run `merge BASE ADAPTER... -o tmp_path/work/out EXTRA`; assert the exit code, the message (no traceback),
    that the inputs are byte-identical and that nothing (output or staging dir) was left; returns stderr."""
    before = digest(*inputs)
    work = tmp_path / "work"
    work.mkdir()
    got, _, err = run_cli(capsys, "merge", *inputs, "-o", work / "out", *extra)
    assert got == code, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert list(work.iterdir()) == [], "an output or staging dir was left behind"
    assert digest(*inputs) == before, "an input was modified"
    return err


def save_model(model: torch.nn.Module, directory: Path) -> None:
    """save_pretrained as safetensors whatever the installed release's default (transformers before 4.35 and PEFT
    before 0.6 write .bin unless asked)."""
    accepted = inspect.signature(model.save_pretrained).parameters
    try:
        model.save_pretrained(
            str(directory), **({"safe_serialization": True} if "safe_serialization" in accepted else {})
        )
    except RuntimeError as error:
        if "share memory" not in str(error):
            raise
        model.save_pretrained(str(directory))  # PEFT 0.4 with bias="all" and a saved module: .bin, as its users got
        return
    bin_file = Path(directory) / "adapter_model.bin"
    if "safe_serialization" not in accepted and bin_file.is_file():
        # PEFT 0.3 writes only .bin, and reads only .bin; the suite's tests edit the safetensors copy, which is what
        # safe-merge reads first (and migrates back to .bin for 0.3)
        from safetensors.torch import save_file

        tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
        # the .bin keeps tensors PEFT shares (bias="all" beside a saved module); safetensors wants them apart
        save_file({k: v.clone() for k, v in tensors.items()}, str(Path(directory) / "adapter_model.safetensors"))


def save_adapter(case: Case, base: torch.nn.Module, adapter_dir: Path) -> None:
    """Train-like adapter: get_peft_model on a float32 copy of the base, real values filled in, saved."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), lora_config(case))
    fill_adapter(peft_model, case)
    save_model(peft_model, adapter_dir)


def materialize(case: Case, root: Path) -> tuple[Path, Path]:
    """Write the base (float32) and the adapter of an HF-architecture case; returns their directories."""
    base = build_base(case)
    base_dir, adapter_dir = root / "base", root / "adapter"
    save_model(base, base_dir)
    save_adapter(case, base, adapter_dir)
    return base_dir, adapter_dir


SMALL_LLAMA = Case(
    "llama",
    TINY["one_layer"],
    False,
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "float32",
    seed=4,
)  # a one-layer Llama and a LoRA on two projections: the inputs of tests about files, paths and commands


def small_pair(root: Path) -> tuple[Path, Path]:
    """SMALL_LLAMA's base and adapter, written under ``root``."""
    return materialize(SMALL_LLAMA, root)


def probe_ids(case: Case) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, case.sizes["vocab"], (2, 6), generator=gen)


def merge_in_memory(case: Case, root: Path, dtype: torch.dtype) -> tuple[Verification, torch.nn.Module]:
    """The custom-model path (no from_pretrained): merge and verify in memory; returns the result and the
    merged model."""
    base = build_base(case)
    adapter_dir = root / "adapter"
    if not adapter_dir.exists():
        save_adapter(case, base, adapter_dir)
    adapter = load_adapter(adapter_dir)
    typed = copy.deepcopy(base).to(dtype)
    base_params = {k: v.clone() for k, v in typed.state_dict().items()}
    reference = loading.load_peft(copy.deepcopy(typed), adapter_dir)
    merged, _ = merge_model(copy.deepcopy(typed), adapter)
    result = verify_models(adapter, base_params, layer_kinds(typed), merged, reference, probe_ids(case))
    return result, merged
