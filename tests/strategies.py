"""Hypothesis strategies: tiny models and LoRA configs the installed PEFT release can build.

A drawn ``Case`` is plain data (architecture, sizes, LoRA keyword arguments, dtype, seed), so a failing example
prints as something a person can rebuild by hand. ``build_base`` and ``make_adapter`` turn it into a model and a
saved adapter whose lora_B (and DoRA magnitudes, biases, saved modules) hold real non-zero values sized like
the base weights, so a merge that did nothing, or did it wrong, cannot look right.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import peft
import torch
from hypothesis import strategies as st
from packaging.version import Version
from torch import nn

from tests.release import HISTORY, INSTALLED, base_layer, has_key

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# What the installed PEFT can do (feature-detected, never assumed from the newest release)

_has = has_key


def _has_dora_layer(name: str) -> bool:
    """DoRA reached Embedding and Conv layers later than Linear; the layer classes say whether it is here."""
    try:
        from peft.tuners.lora import dora
    except ImportError:
        return False
    return hasattr(dora, name)


# Releases whose merge of a feature is known wrong or crashes refuse it (tests/merger/test_known_bugs.py): not
# drawn there.
_DORA_MERGES = not HISTORY.affected("dora_half_precision_merge_raises", INSTALLED)
FEATURES = {
    "rank_pattern": _has("rank_pattern"),
    "use_rslora": _has("use_rslora"),
    "use_dora": _has("use_dora") and _DORA_MERGES,
    "dora_embedding": _has("use_dora")
    and _DORA_MERGES
    and _has_dora_layer("DoraEmbeddingLayer")
    and not HISTORY.affected("dora_embedding_merge_wrong", INSTALLED),
    "dora_conv": _has("use_dora") and _has_dora_layer("DoraConv2dLayer"),
    "dora_fan_in_fan_out": not HISTORY.affected("dora_fan_in_fan_out_crashes", INSTALLED),
    "lora_bias": _has("lora_bias") and not HISTORY.affected("lora_bias_merge_unscaled", INSTALLED),
    "layers_to_transform": _has("layers_to_transform"),
    # 0.3.x merges neither LoRA on embeddings nor GPT-2 nor a model without a config (refused: test_known_bugs)
    "embedding_merge": not HISTORY.affected("merge_embedding_lora_crashes", INSTALLED),
    "config_free_merge": not HISTORY.affected("merge_refuses_gpt2", INSTALLED),
    "writes_safetensors": HISTORY.boundary("reads_safetensors") <= Version(INSTALLED),
    "trainable_tokens": _has("trainable_token_indices"),
    "olora_init": Version(HISTORY.init_values["olora"]["first"]) <= Version(INSTALLED),
}


# ---------------------------------------------------------------------------------------------------------------
# Architectures: module names LoRA may target, with their layer kind and whether the layer has a bias.


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "linear" | "conv1d" (GPT-2, fan_in_fan_out) | "conv" | "embedding"
    bias: bool
    per_layer: bool = True  # lives inside the repeated block (eligible for layers_to_transform)


@dataclass(frozen=True)
class Arch:
    name: str
    task_type: str | None
    targets: tuple[Target, ...]
    tied: str = "never"  # "never" | "always" | "maybe"
    save_candidates: tuple[str, ...] = ()  # modules a user would list in modules_to_save


def _lin(name, bias=True, per_layer=True):
    return Target(name, "linear", bias, per_layer)


ARCHS = {
    "llama": Arch(
        "llama",
        "CAUSAL_LM",
        tuple(_lin(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        + tuple(_lin(n, bias=False) for n in ("gate_proj", "up_proj", "down_proj"))
        + (Target("embed_tokens", "embedding", False, False), _lin("lm_head", bias=False, per_layer=False)),
        tied="maybe",
        save_candidates=("lm_head",),
    ),
    "gpt2": Arch(
        "gpt2",
        "CAUSAL_LM",
        (
            Target("c_attn", "conv1d", True),
            Target("c_proj", "conv1d", True),
            Target("c_fc", "conv1d", True),
            Target("wte", "embedding", False, False),
        ),
        tied="always",
    ),
    "bert_cls": Arch(
        "bert_cls",
        "SEQ_CLS",
        tuple(_lin(n) for n in ("query", "key", "value", "dense")),
        save_candidates=("pooler.dense",),
    ),
    "opt": Arch(
        "opt",
        "CAUSAL_LM",
        tuple(_lin(n) for n in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
        + (Target("embed_tokens", "embedding", False, False),),
        tied="always",
    ),
    "custom": Arch(
        "custom",
        None,
        (
            Target("emb", "embedding", False, False),
            Target("conv", "conv", True, False),
            _lin("lin1", per_layer=False),
            _lin("lin2", per_layer=False),
        ),
        save_candidates=("head",),
    ),
}


class TinyMixed(nn.Module):
    """A plain torch model (PEFT's custom-model path): Embedding → Conv2d → Linear stack → head."""

    def __init__(self, vocab: int = 32, dim: int = 8, channels: int = 3, hidden: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, input_ids):
        x = self.emb(input_ids).unsqueeze(1)  # [batch, 1, length, dim]
        x = self.conv(x).mean(dim=1)  # [batch, length, dim]
        x = self.lin2(torch.relu(self.lin1(x))) + x
        return self.head(x)


# ---------------------------------------------------------------------------------------------------------------
# The drawn case


@dataclass
class Case:
    arch: str
    sizes: dict
    tied: bool
    lora: dict
    dtype: str
    seed: int
    delta_scale: float = 0.6  # each module's delta is this many times the std of its base weight
    zero_b: bool = False
    notes: list = field(default_factory=list)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def build_base(case: Case) -> nn.Module:
    """The base model for a case, float32, seeded."""
    torch.manual_seed(case.seed)
    s = case.sizes
    if case.arch == "custom":
        return TinyMixed(vocab=s["vocab"], dim=s["hidden"], channels=s["channels"], hidden=2 * s["hidden"]).eval()
    import transformers as tf

    common = dict(vocab_size=s["vocab"])
    if case.arch == "llama":
        config = tf.LlamaConfig(
            hidden_size=s["hidden"],
            intermediate_size=2 * s["hidden"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            max_position_embeddings=32,
            tie_word_embeddings=case.tied,
            attention_bias=True,
            **common,
        )
        model = tf.LlamaForCausalLM(config)
    elif case.arch == "gpt2":
        config = tf.GPT2Config(
            n_embd=s["hidden"],
            n_layer=s["layers"],
            n_head=s["heads"],
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
        model = tf.GPT2LMHeadModel(config)
    elif case.arch == "bert_cls":
        config = tf.BertConfig(
            hidden_size=s["hidden"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            intermediate_size=2 * s["hidden"],
            max_position_embeddings=32,
            num_labels=3,
            **common,
        )
        model = tf.BertForSequenceClassification(config)
    elif case.arch == "opt":
        config = tf.OPTConfig(
            hidden_size=s["hidden"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            ffn_dim=2 * s["hidden"],
            max_position_embeddings=32,
            word_embed_proj_dim=s["hidden"],
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
        model = tf.OPTForCausalLM(config)
    else:
        raise ValueError(case.arch)
    return model.eval()


def lora_config(case: Case):
    kwargs = dict(case.lora)
    task = ARCHS[case.arch].task_type
    if task is not None:
        kwargs["task_type"] = task
    kwargs["init_lora_weights"] = False
    # 0.3.x defaults both to None, which its own get_peft_model cannot take; these are later releases' defaults
    kwargs.setdefault("lora_dropout", 0.0)
    kwargs.setdefault("lora_alpha", 8)
    accepted = set(inspect.signature(peft.LoraConfig).parameters)
    return peft.LoraConfig(**{k: v for k, v in kwargs.items() if k in accepted})


@torch.no_grad()
def fill_adapter(peft_model: nn.Module, case: Case) -> None:
    """Give every trained tensor a real value: each module's delta sized like its base weight, lora_bias, DoRA
    magnitudes and saved modules moved away from their initial values (or lora_B zeroed for the zero case)."""
    gen = torch.Generator().manual_seed(case.seed + 1)

    def noise(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)

    for module in peft_model.modules():
        lora_a = getattr(module, "lora_A", None)
        emb_a = getattr(module, "lora_embedding_A", None)
        if isinstance(lora_a, nn.ModuleDict) and len(lora_a):
            for adapter, a_layer in lora_a.items():
                b_layer = module.lora_B[adapter]
                _fill_pair(module, adapter, a_layer.weight, b_layer.weight, noise, case)
                if b_layer.bias is not None:
                    b_layer.bias.copy_(0.0 if case.zero_b else 0.5 * noise(b_layer.bias))
        if isinstance(emb_a, nn.ParameterDict) and len(emb_a):
            for adapter, a in emb_a.items():
                _fill_pair(module, adapter, a, module.lora_embedding_B[adapter], noise, case)
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes:
            for adapter in list(magnitudes.keys()):
                holder = magnitudes[adapter]
                m = holder.weight if hasattr(holder, "weight") else holder
                m.copy_(m * (1.0 + 0.25 * noise(m)))
    for name, param in peft_model.named_parameters():
        is_saved_copy = ".modules_to_save." in name
        is_trained_bias = (
            case.lora.get("bias", "none") != "none"
            and name.endswith(".bias")
            and "lora_" not in name
            and ".original_module." not in name  # never in the forward pass, so training never moves it
        )
        if (is_saved_copy or is_trained_bias) and not case.zero_b:
            param.copy_(param + 0.05 + 0.1 * noise(param))


def _fill_pair(module, adapter, a, b, noise, case: Case) -> None:
    a.copy_(noise(a))
    if case.zero_b:
        b.zero_()
        return
    b.copy_(noise(b))
    base_weight = base_layer(module).weight
    scale = module.scaling[adapter]
    delta_std = float((scale * _product(module, a, b)).float().std())
    target = case.delta_scale * max(float(base_weight.float().std()), 1e-3)
    if delta_std > 0:
        b.mul_(target / delta_std)


def _product(module, a, b) -> torch.Tensor:
    if a.dim() > 2:  # conv: [r, in, *k] and [out, r, 1, ...]
        return torch.einsum("or,r...->o...", b.reshape(b.shape[0], b.shape[1]), a)
    return b @ a


# ---------------------------------------------------------------------------------------------------------------
# Fixed tiny sizes, for the tests that build one model by hand instead of drawing one: a test keeps the sizes it
# was written with, and says which by name (``{**TINY["one_layer"], "hidden": 32}`` for a variation).

TINY = {
    "two_layers": {"vocab": 32, "hidden": 16, "layers": 2, "heads": 2, "kv_heads": 2},
    "one_layer": {"vocab": 32, "hidden": 16, "layers": 1, "heads": 2, "kv_heads": 2},
}


# ---------------------------------------------------------------------------------------------------------------
# Strategies


@st.composite
def sizes_for(draw, arch: str) -> dict:
    heads = draw(st.sampled_from([2, 4]))
    hidden = heads * draw(st.sampled_from([4, 8]))
    sizes = {
        "vocab": draw(st.integers(24, 48)),
        "hidden": hidden,
        "layers": draw(st.integers(1, 2)),
        "heads": heads,
        "kv_heads": draw(st.sampled_from([h for h in (1, 2, heads) if heads % h == 0])),
    }
    if arch == "custom":
        sizes["channels"] = draw(st.integers(1, 3))
    return sizes


@st.composite
def lora_kwargs(draw, arch: Arch, sizes: dict, *, plain: bool = False) -> dict:
    """LoRA keyword arguments; ``plain`` leaves out what changes a zero-B merge (DoRA, biases, saved modules)."""
    allowed = [t for t in arch.targets if t.kind != "embedding" or FEATURES["embedding_merge"]]
    targets = draw(st.lists(st.sampled_from(allowed), min_size=1, max_size=len(allowed), unique=True))
    kinds = {t.kind for t in targets}
    kw: dict = {
        "r": draw(st.integers(1, 8)),
        "lora_alpha": draw(st.sampled_from([1, 4, 8, 16, 32])),
        "target_modules": sorted(t.name for t in targets),
        "lora_dropout": 0.0,
    }
    if "conv1d" in kinds:
        kw["fan_in_fan_out"] = True
    if FEATURES["use_rslora"] and draw(st.booleans()):
        kw["use_rslora"] = True
    if FEATURES["rank_pattern"] and draw(st.booleans()):
        chosen = draw(st.sampled_from(targets)).name
        kw["rank_pattern"] = {chosen: draw(st.integers(1, 8))}
        kw["alpha_pattern"] = {chosen: draw(st.sampled_from([2, 6, 24]))}
    if (
        FEATURES["layers_to_transform"]
        and sizes["layers"] > 1
        and all(t.per_layer for t in targets)
        and draw(st.booleans())
    ):
        kw["layers_to_transform"] = [draw(st.integers(0, sizes["layers"] - 1))]
    if plain:
        return kw
    dora_ok = FEATURES["use_dora"] and (
        ("embedding" not in kinds or FEATURES["dora_embedding"])
        and ("conv" not in kinds or FEATURES["dora_conv"])
        and ("conv1d" not in kinds or FEATURES["dora_fan_in_fan_out"])
    )
    if dora_ok and draw(st.booleans()):
        kw["use_dora"] = True
    elif FEATURES["lora_bias"] and all(t.bias for t in targets) and "embedding" not in kinds and draw(st.booleans()):
        kw["lora_bias"] = True
    kw["bias"] = draw(st.sampled_from(["none", "none", "all"]))
    untargeted = [
        m for m in arch.save_candidates if not any(m == t or m.endswith("." + t) for t in kw["target_modules"])
    ]
    if untargeted and draw(st.booleans()):
        kw["modules_to_save"] = [draw(st.sampled_from(untargeted))]
    return kw


@st.composite
def cases(draw, arch: str | None = None, dtype: str | None = None, *, zero_b: bool = False) -> Case:
    """A whole case: architecture, sizes, LoRA config, dtype and seed."""
    name = arch or draw(st.sampled_from(sorted(ARCHS)))
    spec = ARCHS[name]
    sizes = draw(sizes_for(name))
    tied = spec.tied == "always" or (spec.tied == "maybe" and draw(st.booleans()))
    return Case(
        arch=name,
        sizes=sizes,
        tied=tied,
        lora=draw(lora_kwargs(spec, sizes, plain=zero_b)),
        dtype=dtype or draw(st.sampled_from(sorted(DTYPES))),
        seed=draw(st.integers(0, 2**16)),
        delta_scale=draw(st.sampled_from([0.5, 1.0, 2.0])),
        zero_b=zero_b,
    )
