"""The output check on a base read as stored (quant/stored/): transformers cannot load every stored format on
this machine (and reads some of them wrongly: FP8 blocks the weight's shape does not divide), so the check runs
on float twins written for it, the base's (and a requantized output's) weights as the codec dequantizes them,
in a temporary directory (TMPDIR) removed when the check ends, whatever ends it.

The unmerged model is PeftModel on dequant(W), which is what the adapter was trained on. A dequantized output is
held to the float tolerance. A requantized one adds what requantizing can explain: how far the outputs move when
each exact merged weight is pushed within its rounding budget (one seeded draw), times OUTPUT_FACTOR.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from safe_merge.io import loading
from safe_merge.io.checkpoint import Checkpoint
from safe_merge.merger.backends.stream import requantize
from safe_merge.merger.backends.stream.layout import BaseView
from safe_merge.merger.backends.stream.write import StreamMerge
from safe_merge.quant.stored.view import StoredView
from safe_merge.verifier.delta import merged_weight
from safe_merge.verifier.outputs import OutputCheck
from safe_merge.verifier.probes import probe_inputs
from safe_merge.verifier.quantized import OUTPUT_FACTOR, sensitivity
from safe_merge.verifier.verdict import check_outputs_dirs

TWIN_PREFIX = ".safe-merge-dequantized-"


def write_twin(view: StoredView, model_dir: Path, out: Path) -> Path:
    """A float model directory: ``view``'s tensors (quantized ones dequantized), its config without the
    quantization."""
    out.mkdir()
    save_file({name: view.read(name).contiguous() for name in view.tensors}, str(out / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def stored_outputs(prep: StreamMerge, stage: Path, base_dir: Path, adapter_dir: Path, twin: bool) -> OutputCheck:
    # in the system's temporary directory (TMPDIR), never beside an input: `verify` reads MERGED as one
    with tempfile.TemporaryDirectory(prefix=TWIN_PREFIX) as tmp:
        base_twin = write_twin(prep.stored, base_dir, Path(tmp) / "base")
        if not prep.requantize:
            return check_outputs_dirs(base_twin, adapter_dir, stage, twin)
        written = StoredView(Checkpoint(stage), prep.stored.quant, prep.dtype)
        merged_twin = write_twin(written, stage, Path(tmp) / "merged")
        check = check_outputs_dirs(base_twin, adapter_dir, merged_twin, twin)
        if check.ran:
            check.tol += OUTPUT_FACTOR * _requantize_sensitivity(prep, base_twin)
        return check


def _requantize_sensitivity(prep: StreamMerge, base_twin: Path) -> float:
    """How far the outputs move when every exact merged weight is pushed within its rounding budget."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = loading.load_model(base_twin, prep.dtype)
    base = BaseView(prep.checkpoint, prep.layout)
    params = dict(twin.named_parameters())
    expected, budgets = {}, {}
    for name in sorted(prep.touched & set(prep.stored.groups)):
        lora = prep.ledger.modules.get(name.removesuffix(".weight")) or prep.ledger.modules.get(name)
        if lora is None or name not in params:  # a stack the model fuses at load: not pushed (said in the docs)
            continue
        origin = requantize.start_value(prep, base, name).to(torch.float64)
        expected[name] = merged_weight(origin, lora.widened())
        budgets[name] = prep.stored.codec.budget(prep.stored.groups[name], expected[name])
    return sensitivity(twin, expected, budgets, probe_inputs(twin.config, type(twin)))
