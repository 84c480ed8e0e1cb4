"""Tiny quantized checkpoints written the way their libraries write them: a float Llama saved by transformers,
its projection weights then quantized tensor by tensor with the library's own quantizer (transformers' FP8
op, compressed-tensors' compressors), or by safe-merge's codec where the library cannot on a CPU (FP8 blocks a
weight's shape does not divide, which transformers leaves unquantized; gpt-oss's MXFP4 needs triton kernels).
GPTQ and AWQ checkpoints are the ones gptqmodel wrote (tests/fixtures/gptq/)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import peft
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from safe_merge.io.checkpoint import TensorInfo
from safe_merge.io.loading import _dtype_kwarg
from safe_merge.quant.stored.codec import Group
from safe_merge.quant.stored.fp8 import BlockFP8

PROJECTIONS = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.([\w.]+\.)?\w+_proj\.weight$")  # experts' too
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64}  # fmt: skip
TARGETS = ["q_proj", "v_proj", "down_proj"]


def float_model(root: Path, intermediate: int = 128, seed: int = 5) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**SIZES, "intermediate_size": intermediate}, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = root / "float"
    model.save_pretrained(out, safe_serialization=True)
    return out


def adapter_for(float_dir: Path, root: Path, scale: float = 0.5, seed: int = 9) -> Path:
    """A LoRA on the float model with B filled in: ΔW about ``scale`` times each weight's spread."""
    model = LlamaForCausalLM.from_pretrained(float_dir, **{_dtype_kwarg(): torch.float32})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale * 0.02)
    out = root / "adapter"
    lora.save_pretrained(out)
    return out


def _rewrite(float_dir: Path, out: Path, quantization: dict, convert) -> Path:
    out.mkdir()
    tensors = load_file(str(float_dir / "model.safetensors"))
    stored = {}
    for name, value in tensors.items():
        stored.update(convert(name, value) if PROJECTIONS.match(name) else {name: value})
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def fp8_block(float_dir: Path, out: Path, block: tuple[int, int] = (32, 32)) -> Path:
    """transformers' fine-grained FP8, quantized by its own op (ceil-grid by safe-merge's codec where the block
    does not divide the weight: transformers would leave that weight unquantized)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    op = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block)))

    def convert(name, value):
        rows, cols = value.shape
        if rows % block[0] == 0 and cols % block[1] == 0:
            return op._quantize_one(name, value)
        grid = (-(-rows // block[0]), -(-cols // block[1]))
        like = {"w": TensorInfo("w", None, torch.float8_e4m3fn, (rows, cols), 0, 0),
                "s": TensorInfo("s", None, torch.float32, grid, 0, 0)}  # fmt: skip
        group = Group(name, (rows, cols), {"weight": "w", "scale": "s"}, {"block": block})
        parts = BlockFP8().quantize(group, value, like)
        return {name: parts["weight"], name.removesuffix(".weight") + ".weight_scale_inv": parts["scale"]}

    quant = {"quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic", "fmt": "e4m3"}
    return _rewrite(float_dir, out, quant, convert)


def ct_compress(value: torch.Tensor, args, fmt: str) -> tuple[dict, torch.Tensor]:
    """compressed-tensors' own pipeline for one weight: its min-max quantization parameters per tile (a global
    scale first for NVFP4), its compressor; (the stored tensors by local name, the library's decompression)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    rows, cols = value.shape
    if args.strategy in ("group", "tensor_group"):
        tiles = value.reshape(rows, cols // args.group_size, args.group_size)
        low, high = tiles.amin(-1), tiles.amax(-1)
    elif args.strategy == "channel":
        low, high = value.amin(-1, keepdim=True), value.amax(-1, keepdim=True)
    elif args.strategy == "block":
        bh, bw = args.block_structure
        tiles = value.reshape(rows // bh, bh, cols // bw, bw)
        low, high = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    else:
        low, high = value.amin(), value.amax()
    state = {"weight": value}
    if fmt == "nvfp4-pack-quantized":
        state["weight_global_scale"] = generate_gparam(value.amin(), value.amax())
        scale, zero = calculate_qparams(low, high, args, global_scale=state["weight_global_scale"])
    else:
        scale, zero = calculate_qparams(low, high, args)
    state.update(weight_scale=scale, weight_zero_point=zero)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    packed = compressor.compress(state, scheme)
    return packed, compressor.decompress(dict(packed), scheme)["weight"]


def compressed(float_dir: Path, out: Path, weights: dict, fmt: str) -> Path:
    """compressed-tensors: each projection through the library's own pipeline (ct_compress)."""
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs(**weights)

    def convert(name, value):
        module = name.removesuffix(".weight")
        return {f"{module}.{k}": v for k, v in ct_compress(value, args, fmt)[0].items()}

    quant = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(mode="json"),
                                      "input_activations": None, "output_activations": None, "format": fmt}},
        "ignore": ["lm_head"],
    }  # fmt: skip
    return _rewrite(float_dir, out, quant, convert)


GPTQ_FIXTURES = Path(__file__).parents[2] / "fixtures" / "gptq"


def library_written(name: str, root: Path) -> tuple[Path, Path]:
    """A checkpoint gptqmodel wrote (tests/fixtures/gptq/), and a LoRA for its architecture."""
    from transformers import AutoConfig

    base = GPTQ_FIXTURES / name
    config = AutoConfig.from_pretrained(base)
    config.quantization_config = None
    del config.quantization_config
    torch.manual_seed(2)
    model = LlamaForCausalLM(config)
    float_dir = root / f"float-{name}"
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(float_dir)
    return base, adapter_for(float_dir, root)


GPT_OSS = {"hidden_size": 64, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "vocab_size": 96, "max_position_embeddings": 64, "layer_types": ["sliding_attention", "full_attention"],
           "sliding_window": 16}  # fmt: skip
GPT_OSS_FLOAT = ("self_attn", "router", "embed_tokens", "lm_head")


def gpt_oss_mxfp4(root: Path) -> tuple[Path, Path]:
    """A tiny gpt-oss whose experts are stored in MXFP4 as gpt-oss ships them (blocks and scales; quantized by
    safe-merge's codec: transformers' MXFP4 quantizer needs triton kernels), and a LoRA on its attention."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from safe_merge.quant.stored.fp4 import MXFP4Experts

    torch.manual_seed(6)
    root.mkdir(parents=True, exist_ok=True)
    float_dir = root / "float-gpt-oss"
    GptOssForCausalLM(GptOssConfig(**GPT_OSS)).to(torch.bfloat16).save_pretrained(float_dir)
    codec = MXFP4Experts()

    def convert(name, value):
        experts, cols, rows = value.shape
        blocks = (experts, rows, cols // 32, 16)
        like = {"b": TensorInfo("b", None, torch.uint8, blocks, 0, 0),
                "s": TensorInfo("s", None, torch.uint8, blocks[:3], 0, 0)}  # fmt: skip
        parts = codec.quantize(Group(name, value.shape, {"blocks": "b", "scales": "s"}), value, like)
        return {f"{name}_blocks": parts["blocks"], f"{name}_scales": parts["scales"]}

    out = root / "gpt-oss-mxfp4"
    out.mkdir()
    tensors = load_file(str(float_dir / "model.safetensors"))
    stored = {}
    for name, value in tensors.items():
        stored.update(
            convert(name, value) if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else {name: value}
        )
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model = GptOssForCausalLM.from_pretrained(float_dir, **{_dtype_kwarg(): torch.float32})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    lora.save_pretrained(root / "gpt-oss-adapter")
    return out, root / "gpt-oss-adapter"
