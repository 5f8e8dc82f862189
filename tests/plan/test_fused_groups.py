"""Fused groups share one weight_scale_2 (and input_scale) bit for bit, wherever their shards are."""

import json
import logging
import re
from collections import defaultdict

import pytest
import torch
from checkpoints import load_dir, make_model_checkpoint
from vllm_oracle.client import disagreements, oracle

from modelopt_streaming import quantize
from modelopt_streaming.codec import nvfp4
from modelopt_streaming.source.index import build_index

ARCHS = ["llama", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "kimi_k2"]
PARTNERS = {
    "q_proj": "q/k/v",
    "k_proj": "q/k/v",
    "v_proj": "q/k/v",
    "gate_proj": "gate/up",
    "up_proj": "gate/up",
    "w1": "w1/w3",
    "w3": "w1/w3",
    "q_a_proj": "q_a/kv_a",
    "kv_a_proj_with_mqa": "q_a/kv_a",
}
# Groups a hand count of each tiny config gives (default scope): q/k/v per layer, gate/up per dense MLP,
# shared expert and routed expert, w1/w3 per Mixtral expert, q_a/kv_a per MLA layer.
EXPECTED_GROUPS = {
    "llama": {"gate/up": 2, "q/k/v": 2},
    "qwen3_moe": {"gate/up": 8, "q/k/v": 2},
    "qwen2_moe": {"gate/up": 10, "q/k/v": 2},
    "mixtral": {"q/k/v": 2, "w1/w3": 8},
    "deepseek_v3": {"gate/up": 1 + 2 * 5, "q_a/kv_a": 3},
    "kimi_k2": {"gate/up": 1 + 2 * 5, "q_a/kv_a": 3},
}


def groups_in_output(tensors):
    """Fused groups found in a written checkpoint, independently of the planner's code."""
    groups = defaultdict(dict)
    for name in tensors:
        m = re.match(r"(.*)\.([^.]+)\.weight_scale_2$", name)
        if m and m.group(2) in PARTNERS:
            groups[(PARTNERS[m.group(2)], m.group(1))][m.group(2)] = m.group(1) + "." + m.group(2)
    return {k: v for k, v in groups.items() if len(v) >= 2}


@pytest.fixture(scope="module", params=ARCHS)
def run(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    src = make_model_checkpoint(base / "src", request.param, n_shards=4)
    plan = quantize(src, dry_run=True)
    quantize(src, base / "out", progress="none", max_shard_size=20_000)
    return request.param, src, base / "out", plan


def test_partners_sit_in_different_source_shards(run):
    arch, src, _, _ = run
    index = build_index(src)
    split = 0
    for (_kind, _parent), members in groups_in_output(
        {f"{k[:-7]}.weight_scale_2": 0 for k in index.tensors if k.endswith(".weight")}
    ).items():
        split += len({index[f"{m}.weight"].file for m in members.values()}) > 1
    assert split > 0, f"{arch}: no fused group straddles shards; the test would prove nothing"


def test_group_scales_bit_identical_and_from_group_amax(run):
    arch, src, out, _ = run
    source = load_dir(src)
    tensors = load_dir(out)
    groups = groups_in_output(tensors)
    assert groups
    for (_kind, _parent), members in groups.items():
        scales = [tensors[f"{m}.weight_scale_2"] for m in members.values()]
        inputs = [tensors[f"{m}.input_scale"] for m in members.values()]
        assert all(torch.equal(scales[0].view(torch.int32), s.view(torch.int32)) for s in scales), members
        assert all(torch.equal(inputs[0], s) for s in inputs)
        amax = max(source[f"{m}.weight"].float().abs().max() for m in members.values())
        assert torch.equal(scales[0], amax * torch.tensor(1 / 2688, dtype=torch.float32))


def test_dry_run_counts_equal_written_groups(run):
    arch, _, out, plan = run
    written = defaultdict(int)
    for kind, _ in groups_in_output(load_dir(out)):
        written[kind] += 1
    assert plan.fused_groups == dict(written) == EXPECTED_GROUPS[arch]


def test_every_written_tensor_is_indexed_and_config_is_exact(run, vllm_python):
    arch, src, out, _ = run
    tensors = load_dir(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(list(out.glob("*.safetensors"))) > 1
    exclude = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    # The config is judged by vLLM's own code: every layer its model class builds gets the decision
    # (NVFP4 or not) that our tensors hold (vllm_oracle/asked_layers.py).
    answer = oracle(vllm_python).layers([out])[str(out)]
    assert "error" not in answer, answer["error"]
    assert not disagreements(answer, out, absent_ok=("vision_tower.", "mm_projector."))
    linear = {k[: -len(".weight")] for k, t in load_dir(src).items() if k.endswith(".weight") and t.dim() == 2}
    quantized = {k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")}
    for module in linear:
        if module in quantized:
            assert tensors[f"{module}.weight"].dtype == torch.uint8
        else:
            assert tensors[f"{module}.weight"].dtype == torch.bfloat16
            assert f"{module}.weight_scale" not in tensors and f"{module}.input_scale" not in tensors
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == exclude
    assert config["quantization_config"]["quant_method"] == "modelopt"


def test_routers_embeddings_heads_and_mtp_stay_unquantized(run):
    arch, _, out, _ = run
    tensors = load_dir(out)
    for name, t in tensors.items():
        if re.search(
            r"(mlp\.gate|block_sparse_moe\.gate|shared_expert_gate|lm_head|embed_tokens|"
            r"layers\.3\.)\.weight$",
            name,
        ):
            assert t.dtype != torch.uint8, name


def test_quantized_bytes_match_codec_on_group_scale(run):
    """Spot check: each member's bytes are the codec's output against the shared group scale."""
    arch, src, out, _ = run
    source, tensors = load_dir(src), load_dir(out)
    for (_kind, _parent), members in list(groups_in_output(tensors).items())[:3]:
        for m in members.values():
            packed, scale = nvfp4.quantize(source[f"{m}.weight"], tensors[f"{m}.weight_scale_2"])
            assert torch.equal(packed, tensors[f"{m}.weight"])
            assert torch.equal(scale.view(torch.uint8), tensors[f"{m}.weight_scale"].view(torch.uint8))


@pytest.mark.parametrize(
    "scope,expected",
    [
        ("mlp_only", {"gate/up": 11}),
        ("experts_only", {"gate/up": 8}),
    ],
)
def test_scopes_on_deepseek(tmp_path, scope, expected):
    src = make_model_checkpoint(tmp_path / "src", "deepseek_v3", n_shards=2)
    summary = quantize(src, tmp_path / "out", progress="none", **{scope: True})
    assert summary.fused_groups == expected
    tensors = load_dir(tmp_path / "out")
    assert not any("self_attn" in k and k.endswith("weight_scale") for k in tensors)
    if scope == "experts_only":
        assert not any("shared_experts" in k and k.endswith("weight_scale") for k in tensors)
    exclude = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert any("*" in e for e in exclude)  # per-layer attention compacted into wildcards


def test_partly_excluded_group_stays_wholly_unquantized(tmp_path, caplog):
    src = make_model_checkpoint(tmp_path / "src", "llama", n_shards=2)
    caplog.set_level(logging.INFO, logger="modelopt_streaming")
    summary = quantize(src, tmp_path / "out", exclude=["model.layers.0.self_attn.k_proj"], progress="none")
    tensors = load_dir(tmp_path / "out")
    for leaf in ("q_proj", "k_proj", "v_proj"):
        assert tensors[f"model.layers.0.self_attn.{leaf}.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.o_proj.weight"].dtype == torch.uint8
    assert summary.fused_groups == {"gate/up": 2, "q/k/v": 1}
    assert any("q/k/v group left wholly unquantized" in line for line in caplog.messages)
    # q and v are counted under one category, k under the option that excluded it.
    assert summary.unquantized_by_reason["fused partner unquantized"] == 2
    assert summary.unquantized_by_reason["--exclude"] == 1


def test_one_excluded_expert_unquantizes_its_moe_layer(tmp_path, caplog):
    src = make_model_checkpoint(tmp_path / "src", "qwen3_moe", n_shards=2)
    caplog.set_level(logging.INFO, logger="modelopt_streaming")
    quantize(src, tmp_path / "out", exclude=["model.layers.1.mlp.experts.2.down_proj"], progress="none")
    tensors = load_dir(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if "layers.1.mlp.experts" in k)
    assert all(
        t.dtype == torch.uint8 for k, t in tensors.items() if "layers.0.mlp.experts" in k and k.endswith("proj.weight")
    )
    assert any("routed experts left wholly unquantized" in line for line in caplog.messages)


def test_exclude_config_reuses_reference_list(tmp_path):
    src = make_model_checkpoint(tmp_path / "src", "deepseek_v3", n_shards=2)
    ref = tmp_path / "hf_quant_config.json"
    ref.write_text(
        json.dumps(
            {"quantization": {"exclude_modules": ["lm_head", "model.layers.*.self_attn*", "model.layers.0.mlp*"]}}
        )
    )
    summary = quantize(src, tmp_path / "out", exclude_config=ref, progress="none")
    tensors = load_dir(tmp_path / "out")
    assert tensors["model.layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.shared_experts.gate_proj.weight"].dtype == torch.uint8
    assert summary.fused_groups == {"gate/up": 10}
