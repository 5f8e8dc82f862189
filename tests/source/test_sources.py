"""Vendor source formats read without a bf16 copy on disk: DeepSeek-V3/R1's 128x128 block FP8."""

import json
import math
import subprocess
import sys

import pytest
import torch
from checkpoints import checkpoint_layout, load_dir, make_weights, write_checkpoint

from modelopt_streaming import quantize
from modelopt_streaming.validate import validate

BLOCK = 128


def to_block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's layout: float8_e4m3fn weight and float32 inverse scale per 128 x 128 block."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(br * BLOCK, bc * BLOCK)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(br, BLOCK, bc, BLOCK)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale_inv[:, None, :, None]).reshape(br * BLOCK, bc * BLOCK)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale_inv


def dequantize_by_hand(w8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """The oracle, written independently of the reader: expand the scale to full size, multiply, round."""
    rows, cols = w8.shape
    full = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return (w8.float() * full).to(torch.bfloat16)


def is_fp8_linear(name: str, t: torch.Tensor) -> bool:
    # DeepSeek-V3 ships every Linear in FP8 except the router, lm_head, embeddings (and norms, 1-D).
    return (
        name.endswith(".weight")
        and t.dim() == 2
        and "embed_tokens" not in name
        and "lm_head" not in name
        and not name.endswith("mlp.gate.weight")
        and "shared_head.head" not in name
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("fp8")
    layout, cfg = checkpoint_layout("deepseek_v3")
    weights = make_weights(layout, seed=5)
    fp8, bf16 = {}, {}
    for name, t in weights.items():
        if is_fp8_linear(name, t):
            w8, s = to_block_fp8(t)
            fp8[name], fp8[name + "_scale_inv"] = w8, s
            bf16[name] = dequantize_by_hand(w8, s)
        else:
            fp8[name] = bf16[name] = t
    fp8_cfg = dict(
        cfg,
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    )

    def far_apart(names):  # every scale in another shard than its weight
        return [1 if n.endswith("_scale_inv") else 0 for n in names]

    src_fp8 = write_checkpoint(base / "fp8", fp8, fp8_cfg, far_apart)
    src_bf16 = write_checkpoint(base / "bf16", bf16, cfg, far_apart)
    return base, src_fp8, src_bf16


@pytest.mark.parametrize("scope", [{}, {"mlp_only": True}])
def test_fp8_source_equals_its_bf16_dequantization(pair, scope):
    base, src_fp8, src_bf16 = pair
    tag = "mlp" if scope else "all"
    out_fp8, out_bf16 = base / f"out-fp8-{tag}", base / f"out-bf16-{tag}"
    s8 = quantize(src_fp8, out_fp8, progress="none", **scope)
    s16 = quantize(src_bf16, out_bf16, progress="none", **scope)
    assert s8.fused_groups == s16.fused_groups and s8.quantized_weights == s16.quantized_weights
    a, b = load_dir(out_fp8), load_dir(out_bf16)
    assert sorted(a) == sorted(b)  # no weight_scale_inv survives
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype, name
        assert torch.equal(
            x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
            y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y,
        ), name
    if scope:  # attention stays unquantized: written as bf16, not FP8
        assert a["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.bfloat16
    for f in ("hf_quant_config.json", "model.safetensors.index.json"):
        assert (out_fp8 / f).read_text() == (out_bf16 / f).read_text()
    qc = json.loads((out_fp8 / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and "weight_block_size" not in qc
    assert validate(out_fp8).ok


def test_fp8_weight_without_scale_is_refused(pair, tmp_path):
    _, src_fp8, _ = pair
    import shutil

    bad = shutil.copytree(src_fp8, tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"
    from checkpoints import rewrite_tensor

    rewrite_tensor(bad, victim, None)
    del index["weight_map"][victim]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
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
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in r.stderr and "weight_scale_inv" in r.stderr


def _int4_args():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True, dynamic=False)
    return args, QuantizationScheme(targets=["Linear"], weights=args)


def test_kimi_int4_experts_equal_their_bf16_dequantization(tmp_path):
    """Kimi-K2-Thinking / K2.5 ship routed experts as compressed-tensors pack-quantized INT4; packed and
    unpacked by that library itself, and read back here without a bf16 copy on disk."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args, scheme = _int4_args()
    layout, cfg = checkpoint_layout("kimi_k2")
    weights = make_weights(layout, seed=9)
    int4, bf16 = {}, {}
    for name, t in weights.items():
        if ".mlp.experts." in name and name.endswith(".weight"):
            module = name[: -len(".weight")]
            groups = t.float().reshape(t.shape[0], -1, 32)
            scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            sd = PackedQuantizationCompressor.compress({"weight": t, "weight_scale": scale.to(torch.bfloat16)}, scheme)
            for k, v in sd.items():
                int4[f"{module}.{k}"] = v
            bf16[name] = PackedQuantizationCompressor.decompress(sd, scheme)["weight"].to(torch.bfloat16)
        else:
            int4[name] = bf16[name] = t
    assert any(k.endswith("weight_packed") for k in int4)
    int4_cfg = dict(
        cfg,
        quantization_config={
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 4, "type": "int", "group_size": 32, "symmetric": True, "strategy": "group"},
                }
            },
        },
    )
    src_int4 = write_checkpoint(tmp_path / "int4", int4, int4_cfg, lambda names: [i % 3 for i in range(len(names))])
    src_bf16 = write_checkpoint(tmp_path / "bf16", bf16, cfg, lambda names: [i % 3 for i in range(len(names))])
    for scope in ({"mlp_only": True}, {"experts_only": True}):
        a_dir, b_dir = tmp_path / f"a-{len(str(scope))}", tmp_path / f"b-{len(str(scope))}"
        sa = quantize(src_int4, a_dir, progress="none", **scope)
        sb = quantize(src_bf16, b_dir, progress="none", **scope)
        assert sa.fused_groups == sb.fused_groups and sa.fused_groups["gate/up"] >= 8
        a, b = load_dir(a_dir), load_dir(b_dir)
        assert sorted(a) == sorted(b)
        assert not any(k.endswith(("weight_packed", "weight_shape")) for k in a)
        for name in a:
            x, y = a[name], b[name]
            assert x.dtype == y.dtype and torch.equal(
                x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
            ), name
        assert validate(a_dir).ok


def _tiny_int4_checkpoint(directory, shape_values=(32, 64), config_group=32, scale_cols=2):
    """One pack-quantized INT4 weight [32, 64] written by hand: q + 8 in 4-bit fields, 8 per int32."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (32, 64), generator=g, dtype=torch.int64)
    nibbles = (q + 8).reshape(32, 8, 8)
    words = sum(nibbles[..., i] << (4 * i) for i in range(8))
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    tensors = {
        "model.layers.0.mlp.down_proj.weight_packed": packed,
        "model.layers.0.mlp.down_proj.weight_scale": torch.rand(32, scale_cols, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight_shape": torch.tensor(shape_values, dtype=torch.int64),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
    }
    config = {
        "num_hidden_layers": 1,
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "config_groups": {
                "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": config_group}}
            },
        },
    }
    return write_checkpoint(directory, tensors, config), q


def test_int4_hand_packed_decodes_to_hand_dequantization(tmp_path):
    from modelopt_streaming.source.index import build_index
    from modelopt_streaming.source.reader import TensorReader
    from modelopt_streaming.source.vendor import decoded_weights, read_source

    src, q = _tiny_int4_checkpoint(tmp_path / "src")
    index = build_index(src)
    weight = decoded_weights(index)["model.layers.0.mlp.down_proj.weight"]
    scale = load_dir(src)["model.layers.0.mlp.down_proj.weight_scale"]
    expected = (q.float() * scale.float().repeat_interleave(32, dim=1)).to(torch.bfloat16)
    with TensorReader(src) as reader:
        assert torch.equal(read_source(reader, weight), expected)


@pytest.mark.parametrize(
    "bad,where,what",
    [
        ({"shape_values": (32, 80)}, "weight_shape", "does not fit"),
        ({"shape_values": (16, 64)}, "weight_shape", "does not fit"),
        ({"config_group": 128}, "weight_scale", "group size 128"),
        ({"scale_cols": 4}, "weight_scale", "group size 32"),
    ],
)
def test_int4_shape_and_group_size_refused_at_plan_time(tmp_path, bad, where, what):
    """Checked while planning, from the index and the tiny weight_shape tensors: a one-line error naming the
    file and tensor, exit 1, and no output directory made."""
    src, _ = _tiny_int4_checkpoint(tmp_path / "src", **bad)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "modelopt_streaming", "quantize", "--input_dir", str(src), "--output_dir", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "model.safetensors" in line
    assert f"'model.layers.0.mlp.down_proj.{where}'" in line and what in line, line
    assert not out.exists() or not any(out.iterdir())
