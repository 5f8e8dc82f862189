"""Whole checkpoints against NVIDIA ModelOpt's own export (mtq.quantize + export_hf_checkpoint, CPU).

The source checkpoints have their fused partners split across shards; ModelOpt loads them as a model,
we stream them. With --scale_math cpu every weight, weight_scale and weight_scale_2 must be identical.
"""

import json

import pytest
import torch
from checkpoints import load_dir, make_model_checkpoint, modelopt_export, weights_match_modelopt
from checkpoints_extra import modelopt_export_in

from modelopt_streaming import quantize

ARCHS = ["llama", "qwen3_moe", "mixtral", "deepseek_v3"]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    src = make_model_checkpoint(base / "src", request.param, n_shards=3)
    modelopt_export(src, base / "modelopt")
    quantize(src, base / "ours", scale_math="cpu", progress="none")
    if request.param == "deepseek_v3":
        assert any(".layers.3." in k for k in load_dir(base / "ours")), "the MTP layer must be carried over"
    return src, base / "modelopt", base / "ours"


def _without_mtp(ours_dir, tensors):
    """ModelOpt's export drops DeepSeek's MTP layer (the model class has no such module); we copy it."""
    n = json.loads((ours_dir / "config.json").read_text())["num_hidden_layers"]
    mtp = {k for k in tensors if k.startswith(f"model.layers.{n}.")}
    assert all(tensors[k].dtype in (torch.bfloat16, torch.float32) for k in mtp)
    return {k: v for k, v in tensors.items() if k not in mtp}


def test_same_tensor_names_and_dtypes(pair):
    _, ref_dir, ours_dir = pair
    ref, ours = load_dir(ref_dir), _without_mtp(ours_dir, load_dir(ours_dir))
    assert sorted(ref) == sorted(ours)
    assert {k: (ref[k].dtype, tuple(ref[k].shape)) for k in ref} == {
        k: (ours[k].dtype, tuple(ours[k].shape)) for k in ours
    }


def test_weights_and_scales_byte_identical(pair):
    _, ref_dir, ours_dir = pair
    assert weights_match_modelopt(ref_dir, ours_dir) >= 14


def test_same_quantized_modules(pair):
    _, ref_dir, ours_dir = pair
    ref = {k[: -len(".weight_scale")] for k in load_dir(ref_dir) if k.endswith(".weight_scale")}
    ours = {k[: -len(".weight_scale")] for k in load_dir(ours_dir) if k.endswith(".weight_scale")}
    assert ref == ours and ref
    ref_cfg = json.loads((ref_dir / "hf_quant_config.json").read_text())["quantization"]
    our_cfg = json.loads((ours_dir / "hf_quant_config.json").read_text())["quantization"]
    assert ref_cfg["quant_algo"] == our_cfg["quant_algo"] == "NVFP4"
    assert ref_cfg["group_size"] == our_cfg["group_size"] == 16


DTYPE_CASES = [("llama", torch.float16), ("llama", torch.float32), ("qwen3_moe", torch.float16)]


@pytest.fixture(scope="module", params=DTYPE_CASES, ids=[f"{a}-{str(d).split('.')[-1]}" for a, d in DTYPE_CASES])
def pair_in_dtype(request, tmp_path_factory):
    """fp16 and fp32 sources, against ModelOpt with the model loaded (and exported) in that dtype."""
    arch, dtype = request.param
    base = tmp_path_factory.mktemp(f"{arch}_{str(dtype).split('.')[-1]}")
    src = make_model_checkpoint(base / "src", arch, n_shards=2, dtype=dtype)
    modelopt_export_in(src, base / "modelopt", dtype)
    quantize(src, base / "ours", scale_math="cpu", progress="none")
    return dtype, base / "modelopt", base / "ours"


def test_fp16_fp32_sources_byte_identical(pair_in_dtype):
    dtype, ref_dir, ours_dir = pair_in_dtype
    ref, ours = load_dir(ref_dir), load_dir(ours_dir)
    assert sorted(ref) == sorted(ours)
    assert ref["model.embed_tokens.weight"].dtype == ours["model.embed_tokens.weight"].dtype == dtype
    compared = 0
    for name, a in ref.items():
        if name.endswith("input_scale"):
            continue
        b = ours[name]
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert a.dtype == b.dtype and torch.equal(a, b), name
        compared += name.endswith("weight_scale_2")
    assert compared >= 14
