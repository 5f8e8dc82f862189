"""3-D fused experts (GPT-OSS, Llama-4) against NVIDIA ModelOpt 0.47's own export (mtq.quantize + export_hf_checkpoint,
CPU): every tensor identical with --scale_math cpu, ``input_scale`` aside, on every codec path."""

import fnmatch
import json

import pytest
import torch
from checkpoints import load_dir, modelopt_export, write_checkpoint
from checkpoints_extra import make_fused_experts_checkpoint

from modelopt_streaming import quantize
from modelopt_streaming.codec import cpu_kernel, cuda_kernel, nvfp4
from modelopt_streaming.errors import CheckpointError
from modelopt_streaming.plan.build import QuantizeUnit, Recipe, build_plan
from modelopt_streaming.source.index import build_index

EXPERTS = ("gate_up_proj", "down_proj")


# The MoE block's name in each family: GPT-OSS ``mlp``, Llama-4 ``feed_forward`` (with a shared expert).
MOE = {"gpt_oss": "mlp", "llama4": "feed_forward"}


@pytest.fixture(scope="module", params=sorted(MOE))
def gpt_oss(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    src = make_fused_experts_checkpoint(base / "src", request.param, n_shards=3)
    modelopt_export(src, base / "modelopt")
    summary = quantize(src, base / "ours", scale_math="cpu", progress="none")
    return src, base / "modelopt", base / "ours", summary, MOE[request.param]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_modelopt_export_layout_is_what_we_assume(gpt_oss):
    """The facts the plan is built on, read from ModelOpt's real export rather than assumed."""
    src, ref_dir, _, _, moe = gpt_oss
    ref, source = load_dir(ref_dir), load_dir(src)
    name = f"model.layers.0.{moe}.experts.gate_up_proj"
    n_exp, hidden, out = source[name].shape
    assert ref[name].dtype == torch.uint8 and ref[name].shape == (n_exp, hidden // 2, out)
    assert ref[f"{name}_weight_scale"].dtype == torch.float8_e4m3fn
    assert ref[f"{name}_weight_scale"].shape == (n_exp, hidden // 16, out)
    assert ref[f"{name}_weight_scale_2"].shape == ref[f"{name}_input_scale"].shape == ()
    if moe == "mlp":  # GPT-OSS experts have biases, Llama-4's none
        assert ref[f"model.layers.0.{moe}.experts.gate_up_proj_bias"].dtype == torch.bfloat16
    assert ref[f"model.layers.0.{moe}.router.weight"].dtype == torch.bfloat16


def test_every_tensor_identical_to_modelopt(gpt_oss):
    _, ref_dir, ours_dir, _, moe = gpt_oss
    ref, ours = load_dir(ref_dir), load_dir(ours_dir)
    assert sorted(ref) == sorted(ours)
    experts = 0
    for name, t in ref.items():
        if name.endswith("input_scale"):
            assert ours[name].dtype == torch.float32 and ours[name].shape == ()  # ModelOpt's is calibrated
            continue
        assert _same(t, ours[name]), name
        experts += name.endswith(EXPERTS)
    assert experts == 4  # 2 layers x (gate_up_proj, down_proj), packed codes compared byte for byte


def test_routers_listed_and_experts_quantized(gpt_oss):
    _, ref_dir, ours_dir, summary, moe = gpt_oss
    ref_cfg = json.loads((ref_dir / "hf_quant_config.json").read_text())["quantization"]
    our_cfg = json.loads((ours_dir / "hf_quant_config.json").read_text())["quantization"]
    assert our_cfg["quant_algo"] == ref_cfg["quant_algo"] == "NVFP4"
    for layer in (0, 1):
        router = f"model.layers.{layer}.{moe}.router"
        assert router in ref_cfg["exclude_modules"]
        assert any(fnmatch.fnmatchcase(router, e) for e in our_cfg["exclude_modules"]), our_cfg["exclude_modules"]
    assert summary.quantized_by_kind["routed_expert"] == 4
    assert summary.unquantized_by_reason["MoE router"] == 2


def _codec_paths():
    def fused_cpu(w, s):
        assert cpu_kernel.available(), "the fused CPU kernel was not built"
        return cpu_kernel.quantize(w, s)

    return {"reference": nvfp4.quantize, "fused_cpu": fused_cpu, "triton_interpreted": cuda_kernel.quantize}


@pytest.mark.parametrize("path", sorted(_codec_paths()))
@pytest.mark.parametrize("leaf", EXPERTS)
def test_every_codec_path_gives_modelopt_bytes(gpt_oss, path, leaf):
    """The C kernel, the torch reference and the Triton kernel (interpreted) behind ``quantize_experts``."""
    src, ref_dir, _, _, moe = gpt_oss
    ref, source = load_dir(ref_dir), load_dir(src)
    name = f"model.layers.1.{moe}.experts.{leaf}"
    w = source[name]
    scale_2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w), "cpu")
    assert torch.equal(scale_2, ref[f"{name}_weight_scale_2"])
    packed, scales = nvfp4.quantize_experts(w, scale_2, _codec_paths()[path])
    assert _same(packed, ref[name])
    assert _same(scales, ref[f"{name}_weight_scale"])


def test_dequantized_experts_are_close_to_the_source(gpt_oss):
    """Blocks run along the input dim: dequantizing expert e's [out, in] view recovers the source."""
    src, _, ours_dir, _, moe = gpt_oss
    ours, source = load_dir(ours_dir), load_dir(src)
    name = f"model.layers.0.{moe}.experts.down_proj"
    w = source[name]
    for e in range(w.shape[0]):
        packed, scales = ours[name][e].t().contiguous(), ours[f"{name}_weight_scale"][e].t().contiguous()
        deq = nvfp4.dequantize(packed, scales, ours[f"{name}_weight_scale_2"])
        rel = ((deq - w[e].t().float()).norm() / w[e].float().norm()).item()
        assert rel < 0.2, (e, rel)


def test_scopes_and_weight_only(gpt_oss, tmp_path):
    src, moe = gpt_oss[0], gpt_oss[4]
    summary = quantize(src, dry_run=True, experts_only=True)
    assert summary.quantized_by_kind == {"routed_expert": 4}
    summary = quantize(src, dry_run=True, mlp_only=True)
    assert summary.quantized_by_kind["routed_expert"] == 4 and "attention" not in summary.quantized_by_kind
    quantize(src, tmp_path / "w4a16", weight_only=True, progress="none")
    out = load_dir(tmp_path / "w4a16")
    assert f"model.layers.0.{moe}.experts.gate_up_proj_weight_scale_2" in out
    assert not [k for k in out if k.endswith("input_scale")]


def test_excluding_one_fused_tensor_leaves_the_whole_moe_layer_unquantized(gpt_oss, tmp_path):
    """vLLM builds one FusedMoE per layer: gate_up and down are quantized together or not at all."""
    src, moe = gpt_oss[0], gpt_oss[4]
    summary = quantize(src, tmp_path / "out", exclude=[f"*.layers.1.{moe}.experts.down_proj"], progress="none")
    out = load_dir(tmp_path / "out")
    for leaf in EXPERTS:
        assert out[f"model.layers.1.{moe}.experts.{leaf}"].dtype == torch.bfloat16
        assert f"model.layers.1.{moe}.experts.{leaf}_weight_scale" not in out
        assert out[f"model.layers.0.{moe}.experts.{leaf}"].dtype == torch.uint8
    assert summary.unquantized_by_reason["--exclude"] == 1
    assert summary.unquantized_by_reason["MoE layer partly unquantized"] == 1
    provenance = json.loads((tmp_path / "out" / "modelopt_streaming.json").read_text())
    assert set(provenance["unquantized"]) >= {f"model.layers.1.{moe}.experts.{leaf}" for leaf in EXPERTS}


def test_unquantizable_experts_are_reported_not_dropped(tmp_path):
    """Experts whose input dim is not a multiple of 16 stay bf16, and the plan says so by name."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(2, 24, 32, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": torch.randn(2, 16, 24, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.router.weight": torch.randn(2, 24, generator=g).to(torch.bfloat16),
    }
    src = write_checkpoint(tmp_path / "src", tensors, {"num_hidden_layers": 1})
    plan = build_plan(build_index(src), Recipe())
    assert plan.unquantized["model.layers.0.mlp.experts.gate_up_proj"] == "input dim not a multiple of 16: 24"
    assert plan.unquantized["model.layers.0.mlp.experts.down_proj"].startswith("MoE layer partly unquantized")
    assert "model.layers.0.mlp.experts.gate_up_proj" in plan.linear_modules
    assert not [u for u in plan.units if isinstance(u, QuantizeUnit)]


def test_non_float_experts_are_refused_at_plan_time(tmp_path):
    tensors = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 32, 32, dtype=torch.int8)}
    src = write_checkpoint(tmp_path / "src", tensors, {"num_hidden_layers": 1})
    with pytest.raises(CheckpointError, match=r"model\.safetensors, tensor 'model\.layers\.0\.mlp\.experts\.gate_up"):
        build_plan(build_index(src), Recipe())


def test_experts_with_the_input_dim_last_are_refused(tmp_path):
    """[E, out, in] under GPT-OSS's names would be blocked along the wrong dim: refused by name, not guessed."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(2, 64, 32, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": torch.randn(2, 32, 32, generator=g).to(torch.bfloat16),
    }
    src = write_checkpoint(tmp_path / "src", tensors, {"num_hidden_layers": 1, "hidden_size": 32})
    with pytest.raises(
        CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.experts\.gate_up_proj': shape \[2, 64, 32\]"
    ):
        build_plan(build_index(src), Recipe())
