"""Each codec against the format's own library: dequantization bit for bit, and requantization code for code
where the library can quantize on CPU (transformers' FP8 ops, compressed-tensors' compressors); MXFP4 against
transformers' dequantization (its quantizer needs triton kernels, which need a GPU)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from safe_merge.io.checkpoint import TensorInfo
from safe_merge.quant.stored.codec import Group
from safe_merge.quant.stored.fp4 import MXFP4Experts, NVFP4Packed
from safe_merge.quant.stored.fp8 import BlockFP8, FloatQuantized
from safe_merge.quant.stored.integer import IntegerQuantized
from tests.quant.stored import checkpoints


def infos(parts: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {n: TensorInfo(n, None, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size()) for n, t in parts.items()}


def weight(shape, seed=0, dtype=torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(shape, generator=gen) * 0.02
    value.view(-1)[7] = 0.25  # one outlier, as real weights have
    return value.to(dtype)


def fp8_ops():
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(fp8, "Fp8Quantize"):
        pytest.skip("this transformers has no FP8 conversion ops")
    from transformers import FineGrainedFP8Config

    quantizer = SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(128, 128)))
    return fp8.Fp8Quantize(quantizer), fp8.Fp8Dequantize(quantizer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_fp8_quantizes_and_dequantizes_as_transformers_does(dtype):
    quantize, dequantize = fp8_ops()
    value = weight((256, 384), dtype=dtype)
    theirs = quantize._quantize_one("m.weight", value)
    group = Group("m.weight", (256, 384), {"weight": "m.weight", "scale": "m.weight_scale_inv"}, {"block": (128, 128)})
    ours = BlockFP8().quantize(
        group, value, infos({"m.weight": theirs["m.weight"], "m.weight_scale_inv": theirs["m.weight_scale_inv"]})
    )
    assert torch.equal(ours["weight"].view(torch.uint8), theirs["m.weight"].view(torch.uint8))
    assert torch.equal(ours["scale"], theirs["m.weight_scale_inv"])
    back = dequantize._dequantize_one(theirs["m.weight"], theirs["m.weight_scale_inv"], dtype)
    mine = BlockFP8().dequantize(group, {"weight": ours["weight"], "scale": ours["scale"]}, dtype)
    assert mine.dtype == back.dtype and torch.equal(mine, back)


def test_block_fp8_with_power_of_two_scales_quantizes_and_dequantizes_as_transformers_does():
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    from transformers import FineGrainedFP8Config

    try:
        config = FineGrainedFP8Config(weight_block_size=(128, 128), scale_fmt="ue8m0")
    except TypeError:
        pytest.skip("this transformers has no ue8m0 scales")
    quantizer = SimpleNamespace(quantization_config=config)
    value = weight((256, 384))
    theirs = fp8.Fp8Quantize(quantizer)._quantize_one("m.weight", value)
    scale = theirs["m.weight_scale_inv"]
    group = Group("m.weight", (256, 384), {"weight": "m.weight", "scale": "m.weight_scale_inv"}, {"block": (128, 128)})
    ours = BlockFP8().quantize(group, value, infos({"m.weight": theirs["m.weight"], "m.weight_scale_inv": scale}))
    assert ours["scale"].dtype == scale.dtype and torch.equal(ours["scale"].float(), scale.float())
    assert torch.equal(ours["weight"].view(torch.uint8), theirs["m.weight"].view(torch.uint8))
    back = fp8.Fp8Dequantize(quantizer)._dequantize_one(theirs["m.weight"], scale, torch.bfloat16)
    assert torch.equal(BlockFP8().dequantize(group, ours, torch.bfloat16), back)


def test_block_fp8_reads_a_ragged_shape_on_the_ceil_grid_where_transformers_infers_another_block():
    _, dequantize = fp8_ops()
    value = weight((192, 128)).float()
    group = Group("m.weight", (192, 128), {"weight": "w", "scale": "s"}, {"block": (128, 128)})
    like = infos({"w": torch.zeros(192, 128, dtype=torch.float8_e4m3fn), "s": torch.zeros(2, 1)})
    parts = BlockFP8().quantize(group, value, like)
    ours = BlockFP8().dequantize(group, parts, torch.float32)
    # rows 128..191 hold their own block's scale: the value comes back within half an e4m3 step
    assert ((ours - value).abs() <= BlockFP8().budget(group, value.double()).float()).all()
    theirs = dequantize._dequantize_one(parts["weight"], parts["scale"], torch.float32)  # block 96 rows
    assert not torch.equal(theirs, ours)


def ct():
    return pytest.importorskip("compressed_tensors", reason="compressed-tensors is in the quant extra")


def ct_compress(value: torch.Tensor, scheme, fmt: str):
    return checkpoints.ct_compress(value, scheme.weights, fmt)


def ct_scheme(**weights):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))


INT_CASES = [
    (
        "w4 group 32 symmetric",
        dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
        "pack-quantized",
    ),
    (
        "w4 group 32 asymmetric",
        dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32),
        "pack-quantized",
    ),
    ("w8 channel symmetric", dict(num_bits=8, type="int", symmetric=True, strategy="channel"), "pack-quantized"),
    ("w8 channel int-quantized", dict(num_bits=8, type="int", symmetric=True, strategy="channel"), "int-quantized"),
]


@pytest.mark.parametrize(("case", "args", "fmt"), INT_CASES, ids=[c[0] for c in INT_CASES])
def test_compressed_tensors_integer_formats_round_trip_as_the_library_does(case, args, fmt):
    ct()
    from compressed_tensors.quantization.quant_args import QuantizationArgs

    scheme = ct_scheme(**args)
    value = weight((64, 128))
    packed, theirs = ct_compress(value, scheme, fmt)
    names = {"codes": "weight_packed" if fmt == "pack-quantized" else "weight", "scale": "weight_scale"}
    if "weight_zero_point" in packed:
        names["zero"] = "weight_zero_point"
    quant = {"config_groups": {"g": {"targets": ["Linear"], "weights": QuantizationArgs(**args).model_dump()}}}
    stored = {f"m.{n}": t for n, t in packed.items()}
    (group,) = IntegerQuantized().groups(infos(stored), quant, lambda n: stored[n])
    parts = {role: stored[name] for role, name in group.parts.items()}
    ours = IntegerQuantized().dequantize(group, parts, theirs.dtype)
    assert torch.equal(ours, theirs)
    again = IntegerQuantized().quantize(group, value, infos(stored))
    for role, tensor in again.items():
        assert torch.equal(tensor, parts[role]), role
    assert ((ours.double() - value.double()).abs() <= IntegerQuantized().budget(group, value.double())).all()


FLOAT_CASES = [
    ("channel", dict(num_bits=8, type="float", symmetric=True, strategy="channel")),
    ("tensor", dict(num_bits=8, type="float", symmetric=True, strategy="tensor")),
    ("block", dict(num_bits=8, type="float", symmetric=True, strategy="block", block_structure=[32, 64])),
]


@pytest.mark.parametrize(("case", "args"), FLOAT_CASES, ids=[c[0] for c in FLOAT_CASES])
def test_compressed_tensors_fp8_round_trips_as_the_library_does(case, args):
    ct()
    from compressed_tensors.quantization.quant_args import QuantizationArgs

    value = weight((64, 128))
    packed, theirs = ct_compress(value, ct_scheme(**args), "float-quantized")
    quant = {"config_groups": {"g": {"targets": ["Linear"], "weights": QuantizationArgs(**args).model_dump()}}}
    stored = {f"m.{n}": t for n, t in packed.items()}
    (group,) = FloatQuantized().groups(infos(stored), quant, lambda n: stored[n])
    parts = {role: stored[name] for role, name in group.parts.items()}
    assert torch.equal(FloatQuantized().dequantize(group, parts, theirs.dtype), theirs)
    again = FloatQuantized().quantize(group, value, infos(stored))
    assert torch.equal(again["weight"].view(torch.uint8), parts["weight"].view(torch.uint8))
    assert torch.equal(again["scale"], parts["scale"])


def test_compressed_tensors_nvfp4_round_trips_as_the_library_does():
    ct()
    args = dict(
        num_bits=4,
        type="float",
        symmetric=True,
        strategy="tensor_group",
        group_size=16,
        scale_dtype=torch.float8_e4m3fn,
    )
    scheme = ct_scheme(**args)
    value = weight((64, 128))
    packed, theirs = ct_compress(value, scheme, "nvfp4-pack-quantized")
    stored = {f"m.{n}": t for n, t in packed.items()}
    (group,) = NVFP4Packed().groups(infos(stored), {}, lambda n: stored[n])
    parts = {role: stored[name] for role, name in group.parts.items()}
    assert torch.equal(NVFP4Packed().dequantize(group, parts, theirs.dtype), theirs)
    again = NVFP4Packed().quantize(group, value, infos(stored))
    for role, tensor in again.items():
        assert torch.equal(
            tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 else tensor,
            parts[role].view(torch.uint8) if parts[role].dtype.itemsize == 1 else parts[role],
        ), role


def test_mxfp4_experts_dequantize_as_transformers_does_and_requantize_within_half_a_step():
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 48, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(118, 126, (2, 48, 2), generator=gen, dtype=torch.uint8)
    # transformers 5 names its arithmetic _convert_moe_packed_tensors; 4.5x had it as convert_moe_packed_tensors
    convert = getattr(mxfp4, "_convert_moe_packed_tensors", None) or getattr(mxfp4, "convert_moe_packed_tensors", None)
    if convert is None:
        pytest.skip("this transformers has no MXFP4 dequantization")
    theirs = convert(blocks, scales, dtype=torch.bfloat16)
    stored = {"e.down_proj_blocks": blocks, "e.down_proj_scales": scales}
    (group,) = MXFP4Experts().groups(infos(stored), {}, lambda n: stored[n])
    assert group.name == "e.down_proj" and group.shape == tuple(theirs.shape)
    ours = MXFP4Experts().dequantize(group, {"blocks": blocks, "scales": scales}, torch.bfloat16)
    assert torch.equal(ours, theirs)
    # values already on the grid come back as they were
    again = MXFP4Experts().quantize(group, ours, infos(stored))
    assert torch.equal(MXFP4Experts().dequantize(group, again, torch.bfloat16), ours)
    value = weight(tuple(theirs.shape)).float()
    moved = MXFP4Experts().dequantize(group, MXFP4Experts().quantize(group, value, infos(stored)), torch.float32)
    assert ((moved.double() - value.double()).abs() <= MXFP4Experts().budget(group, value.double())).all()


GPTQ_FIXTURES = Path(__file__).parents[2] / "fixtures" / "gptq"


@pytest.mark.parametrize("name", ["tiny-gptq-asym", "tiny-gptq-sym-descact", "tiny-awq-asym"])
def test_gptq_and_awq_checkpoints_written_by_gptqmodel_dequantize_as_the_library_does(name):
    """The checkpoints and what gptqmodel dequantizes them to were written by gptqmodel 7.6.0 on a CPU
    (tests/fixtures/gptq/generate.py); it does not install beside this torch, so the comparison is stored."""
    import json

    from safetensors.torch import load_file

    from safe_merge.io.checkpoint import Checkpoint
    from safe_merge.quant.stored.view import StoredView

    directory = GPTQ_FIXTURES / name
    quant = json.loads((directory / "config.json").read_text())["quantization_config"]
    view = StoredView(Checkpoint(directory), quant, torch.float16)
    theirs = load_file(str(directory / "library_dequantized.safetensors"))
    assert set(view.groups) == set(theirs) and len(theirs) == 14
    for group in view.groups.values():
        ours = view.read(group.name)
        assert ours.dtype == theirs[group.name].dtype and torch.equal(ours, theirs[group.name]), group.name
        # quantized again from its own values, every weight comes back within its budget
        again = view.codec.quantize(group, ours.float(), view.stored.tensors)
        back = view.codec.dequantize(group, {**view.parts(group), **again}, torch.float32)
        assert ((back.double() - ours.double()).abs() <= view.codec.budget(group, ours.double())).all(), group.name


def test_act_ordered_compressed_tensors_groups_follow_g_idx_both_ways():
    """Older compressed-tensors checkpoints (actorder "group") store weight_g_idx: column j is in group g_idx[j].
    compressed-tensors 0.20 no longer reads them, so the grouping is checked by what it means: each group's
    scale is its own columns' range, and requantizing keeps every element within half a step."""
    bits, rows, cols, size = 4, 16, 128, 32
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[torch.randperm(cols, generator=torch.Generator().manual_seed(1))] = (
        torch.arange(cols, dtype=torch.int32) // size
    )
    stored = {
        "m.weight_packed": torch.zeros(rows, cols * bits // 32, dtype=torch.int32),
        "m.weight_scale": torch.zeros(rows, cols // size, dtype=torch.bfloat16),
        "m.weight_shape": torch.tensor([rows, cols]),
        "m.weight_g_idx": g_idx,
    }
    quant = {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int",
             "symmetric": True, "strategy": "group", "group_size": size, "actorder": "group"}}}}  # fmt: skip
    (group,) = IntegerQuantized().groups(infos(stored), quant, lambda n: stored[n])
    value = weight((rows, cols))
    parts = {
        **{r: stored[n] for r, n in group.parts.items()},
        **IntegerQuantized().quantize(group, value, infos(stored)),
    }
    for g in range(cols // size):
        columns = value[:, g_idx == g].float()
        expected = (columns.abs().amax(dim=1) / 7.5).to(torch.bfloat16)
        assert torch.equal(parts["scale"][:, g], expected), g
    back = IntegerQuantized().dequantize(group, parts, torch.float32)
    assert ((back.double() - value.double()).abs() <= IntegerQuantized().budget(group, value.double())).all()
