"""Loading base, merged and PeftModel objects across transformers / PEFT releases (feature-detected)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from packaging.version import Version
from torch import nn

from safe_merge.errors import BadInput
from safe_merge.io.checkpoint import safetensors_headers, shard_files
from safe_merge.io.tensorfile import DTYPE_NAMES, FLOATING

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_SAFETENSORS_DTYPES = {name: dtype for name, dtype in DTYPE_NAMES.items() if dtype in FLOATING}


def resolve_dir(name: str | Path, what: str, revision: str | None = None) -> Path:
    """A local directory, or a hub repo id (``ID@REVISION`` pins one) downloaded through huggingface_hub's cache:
    only the files a merge reads (io/hub.py)."""
    from safe_merge.io.hub import resolve

    return resolve(name, what, revision).path


def read_model_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise BadInput("no config.json here", path=model_dir, hint="pass a directory written by save_pretrained")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:
        raise BadInput(f"config.json cannot be read ({exc})", path=model_dir / "config.json") from exc


class ConfigView(SimpleNamespace):
    """config.json read as it is, attributes for keys, without importing transformers (which takes seconds)."""

    def get_text_config(self, *args, **kwargs):
        text = getattr(self, "text_config", None)
        return ConfigView(**text) if isinstance(text, dict) else self

    def to_dict(self) -> dict:
        return dict(vars(self))


def read_config_json(model_dir: Path) -> ConfigView:
    """A model's config.json as plain data: enough to decide and check, before any model class is needed."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise BadInput("no config.json here", path=model_dir, hint="pass a directory written by save_pretrained")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BadInput(f"config.json is not JSON ({exc})", path=path) from exc
    if not isinstance(data, dict):
        raise BadInput("config.json does not hold an object", path=path)
    return ConfigView(**data)


def class_name(config) -> str:
    """The model class save_pretrained recorded (config.architectures), named without importing it."""
    names = getattr(config, "architectures", None) or []
    return str(names[0]) if names else "AutoModel"


# the transformers auto class an adapter's task_type loads its base with, as PEFT's AutoPeftModelFor* classes do
# (tasks whose head the adapter saves in modules_to_save; the other tasks keep the recorded class)
TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def model_class(config, task: str | None = None):
    """The class an adapter's task picks (a head task on a base saved in another class: a classifier adapter on a
    BertForPreTraining checkpoint), else the class named in config.architectures (what save_pretrained recorded),
    else the task-less AutoModel."""
    import transformers

    auto = getattr(transformers, TASK_CLASSES.get(str(task), ""), None)
    if auto is not None:
        try:
            return auto._model_mapping[type(config)]
        except (KeyError, AttributeError):
            pass  # transformers has no such head for this model: the recorded class stands
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def stored_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors checkpoint, from its headers alone (empty for .bin)."""
    return {
        key: tuple(info["shape"])
        for header in safetensors_headers(model_dir)
        for key, info in header.items()
        if key != "__metadata__"
    }


def stored_tensor(model_dir: Path, name: str) -> torch.Tensor | None:
    """One tensor of a safetensors checkpoint, read alone (None when it is not there or the base is .bin)."""
    from safetensors import safe_open

    for file in shard_files(model_dir, required=False):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as fh:
                if name in fh.keys():
                    return fh.get_tensor(name)
    return None


def floating_numel(model_dir: Path) -> int | None:
    """Number of floating-point values in a safetensors checkpoint, from its headers alone (None for .bin)."""
    total, seen = 0, False
    for header in safetensors_headers(model_dir):
        for key, info in header.items():
            if key != "__metadata__" and info.get("dtype") in _SAFETENSORS_DTYPES:
                total += math.prod(info["shape"])
                seen = True
    return total if seen else None


def stored_dtype(model_dir: Path, config=None) -> torch.dtype:
    """The floating dtype the weights are stored in: read from safetensors headers, else from the config."""
    counts: dict[torch.dtype, int] = {}
    for header in safetensors_headers(model_dir):
        for key, info in header.items():
            if key != "__metadata__" and info.get("dtype") in _SAFETENSORS_DTYPES:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                counts[dtype] = counts.get(dtype, 0) + 1
    if counts:
        return max(counts, key=counts.__getitem__)
    return config_dtype(config)


def config_dtype(config) -> torch.dtype:
    """The dtype a config names (float32 where it names none): a quantized checkpoint's own, whose scales may
    outnumber its float tensors."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, torch.dtype):
        return named
    return DTYPES.get(str(named), torch.float32)


def _dtype_kwarg() -> str:
    """transformers renamed from_pretrained's torch_dtype to dtype in 4.56."""
    import transformers

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    *,
    strict: bool = True,
    task: str | None = None,
    num_labels: int | None = None,
    supplied: frozenset[str] = frozenset(),
) -> nn.Module:
    """Load a saved model in ``dtype``, in eval mode, with its recorded class or the one an adapter's ``task``
    picks (with ``num_labels`` outputs, the size of the head the adapter saves).

    With ``strict`` a checkpoint missing parameters is an error: transformers would fill them with random values.
    Parameters in ``supplied`` (the adapter saves them: a task head) may be missing.
    """
    config = read_model_config(model_dir)
    cls = model_class(config, task)
    kwargs = {_dtype_kwarg(): dtype}
    if num_labels is not None and num_labels != getattr(config, "num_labels", None):
        config.num_labels = num_labels  # a fresh id2label of that size, as from_pretrained(num_labels=...) makes
        kwargs["config"] = config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(str(model_dir), output_loading_info=True, **kwargs)
    # a missing buffer is computed in __init__ (transformers 4.31's Llama saves rotary inv_freq; newer ones do not),
    # and a missing tied weight shares a loaded one (transformers 4.28 still lists a tied lm_head as missing)
    buffers = {name for name, _ in model.named_buffers()}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing_set = set(info.get("missing_keys", []))
    loaded = {p.data_ptr() for name, p in params.items() if name not in missing_set}
    missing = [
        k
        for k in info.get("missing_keys", [])
        if k and k not in buffers and k not in supplied and not (k in params and params[k].data_ptr() in loaded)
    ]
    if strict and missing:
        raise MissingWeights(model_dir, sorted(missing))
    return model.eval()


class MissingWeights(BadInput):
    """The config asks for parameters the checkpoint lacks; transformers would fill them with random values.

    Seen for real: transformers 4.31 wrote `attention_bias: true` into a Llama config.json although its Llama
    ignored the option; 5.x honours it and builds biases that were never saved.
    """

    def __init__(self, model_dir: Path, keys: list[str]):
        super().__init__(
            f"the config asks for parameters the checkpoint lacks ({', '.join(keys[:5])}"
            f"{', …' if len(keys) > 5 else ''}); transformers would fill them with random values",
            path=model_dir,
            hint="check config.json for options this transformers honours but the one that saved it ignored",
        )
        self.keys = keys


def load_peft(model: nn.Module, adapter_dir: Path, adapter_name: str = "default") -> nn.Module:
    """Wrap a base model with the adapter, unmerged and active (PEFT's own loading path)."""
    from peft import PeftModel

    with _adapter_errors(adapter_dir):
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name).eval()


def load_extra_adapter(peft_model: nn.Module, adapter_dir: Path, adapter_name: str) -> None:
    """Load one more adapter into a PeftModel, beside the ones it holds."""
    with _adapter_errors(adapter_dir):
        peft_model.load_adapter(str(adapter_dir), adapter_name=adapter_name)


@contextlib.contextmanager
def _adapter_errors(adapter_dir: Path):
    """PEFT's loading errors, as a BadInput naming the adapter; its warnings are the report's business."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0][:300]
        raise BadInput(
            f"PEFT cannot load this adapter onto the base: {type(exc).__name__}: {first_line}",
            path=adapter_dir,
            hint="check that the adapter was trained on this base model",
        ) from exc


def installed_peft() -> str:
    """The installed PEFT release, as the history table names releases (no local or dev suffix); read from the
    package metadata, since importing PEFT takes seconds."""
    return installed("peft")


@functools.cache
def installed(package: str) -> str:
    """An installed package's release without local or dev suffix, from its metadata (nothing is imported; read
    once per process, since parsing the metadata costs milliseconds each time)."""
    from importlib.metadata import version

    return Version(version(package)).base_version


def versions() -> dict:
    from importlib.metadata import version

    import safe_merge

    return {
        "peft": version("peft"),
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "safe_merge": safe_merge.__version__,
    }
