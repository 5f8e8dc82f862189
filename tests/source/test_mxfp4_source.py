"""GPT-OSS's published MXFP4 experts (``X_blocks`` + ``X_scales``) read as bf16 without a copy on disk, like
the FP8 and INT4 sources: checked against a hand computation and transformers' own GPT-OSS dequantizer, then
quantized byte-identical to the same values stored as bf16."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoints import load_dir, write_checkpoint
from checkpoints_extra import make_gpt_oss_checkpoint

from modelopt_streaming import quantize
from modelopt_streaming.source.index import build_index
from modelopt_streaming.source.reader import TensorReader
from modelopt_streaming.source.vendor import decoded_weights, read_source

EXPERTS = ("gate_up_proj", "down_proj")


def _hand_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OCP MXFP4 by the book, in float64 element by element (numpy): [E, out, in/32, 16] -> [E, in, out]."""
    b, s = blocks.numpy().astype(np.int64), scales.numpy().astype(np.int64)
    codes = np.stack((b & 15, b >> 4), axis=-1).reshape(*b.shape[:-1], 32)  # low nibble first
    magnitude = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])[codes & 7]
    sign = np.where(codes & 8, -1.0, 1.0)
    values = sign * magnitude * np.exp2(s[..., None] - 127.0)
    values = values.reshape(b.shape[0], b.shape[1], -1)  # [E, out, in]
    return torch.from_numpy(values.transpose(0, 2, 1).copy()).to(torch.bfloat16)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same GPT-OSS twice: experts as MXFP4 blocks and scales, and as their exact bf16 values."""
    base = tmp_path_factory.mktemp("mxfp4")
    bf16_src = make_gpt_oss_checkpoint(base / "seed", n_shards=1)
    tensors = load_dir(bf16_src)
    config = json.loads((bf16_src / "config.json").read_text())
    g = torch.Generator().manual_seed(5)
    mx, plain = {}, {}
    for name, t in tensors.items():
        if name.endswith(EXPERTS):
            n_exp, n_in, n_out = t.shape
            blocks = torch.randint(0, 256, (n_exp, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(119, 131, (n_exp, n_out, n_in // 32), generator=g, dtype=torch.uint8)
            mx[f"{name}_blocks"], mx[f"{name}_scales"] = blocks, scales
            plain[name] = _hand_decode(blocks, scales)
        else:
            mx[name] = plain[name] = t
    mx_config = dict(
        config,
        quantization_config={
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "lm_head"],
        },
    )
    mx_src = write_checkpoint(base / "mx", mx, mx_config, lambda names: [i % 3 for i in range(len(names))])
    plain_src = write_checkpoint(base / "bf16", plain, config, lambda names: [i % 2 for i in range(len(names))])
    return mx_src, plain_src, mx, plain


def test_decode_equals_hand_computation_and_transformers(pair):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    mx_src, _, mx, plain = pair
    decoded = decoded_weights(build_index(mx_src))
    assert sorted(decoded) == sorted(n for n in plain if n.endswith(EXPERTS))
    with TensorReader(mx_src) as reader:
        for name, weight in decoded.items():
            ours = read_source(reader, weight)
            assert ours.dtype == torch.bfloat16 and ours.shape == plain[name].shape
            assert torch.equal(ours, plain[name]), name
            theirs = convert_moe_packed_tensors(mx[f"{name}_blocks"], mx[f"{name}_scales"])
            assert torch.equal(ours, theirs), name


def test_mxfp4_source_quantizes_like_its_bf16_values(pair, tmp_path):
    mx_src, plain_src, _, _ = pair
    a = quantize(mx_src, tmp_path / "a", scale_math="cpu", progress="none")
    b = quantize(plain_src, tmp_path / "b", scale_math="cpu", progress="none")
    assert a.quantized_by_kind == b.quantized_by_kind and a.quantized_by_kind["routed_expert"] == 4
    ta, tb = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert sorted(ta) == sorted(tb)
    assert not any(k.endswith(("_blocks", "_scales")) for k in ta)
    for name in ta:
        x, y = ta[name], tb[name]
        assert x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"  # the stale mxfp4 block is gone


def test_unquantized_mxfp4_experts_are_written_as_bf16(pair, tmp_path):
    mx_src, _, _, plain = pair
    quantize(mx_src, tmp_path / "out", exclude=["*.mlp.experts.*"], progress="none")
    out = load_dir(tmp_path / "out")
    for name in (n for n in plain if n.endswith(EXPERTS)):
        assert torch.equal(out[name], plain[name]), name


def test_blocks_without_scales_refused_at_plan_time(pair, tmp_path):
    mx_src, _, mx, _ = pair
    tensors = {k: v for k, v in mx.items() if k != "model.layers.1.mlp.experts.down_proj_scales"}
    bad = write_checkpoint(tmp_path / "bad", tensors, json.loads((mx_src / "config.json").read_text()))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelopt_streaming",
            "quantize",
            "--input_dir",
            str(bad),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    line = r.stderr.strip()
    assert r.returncode == 1 and "Traceback" not in r.stderr and "\n" not in line, r.stderr
    assert "model.safetensors" in line and "'model.layers.1.mlp.experts.down_proj_blocks'" in line
    assert "down_proj_scales" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
