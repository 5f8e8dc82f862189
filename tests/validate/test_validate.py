"""The validation commands on checkpoints made by ModelOpt, by compressed-tensors and by us, and broken ones."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from checkpoints import (
    compressed_tensors_nvfp4a16,
    load_dir,
    make_model_checkpoint,
    make_tied_checkpoint,
    modelopt_export,
    rewrite_tensor,
)

from modelopt_streaming import quantize
from modelopt_streaming.validate import validate


def cli(*args):
    return subprocess.run([sys.executable, "-m", "modelopt_streaming", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe")
    src = make_model_checkpoint(base / "src", "qwen3_moe", n_shards=3)
    modelopt_export(src, base / "modelopt")
    quantize(src, base / "ours", scale_math="cpu", progress="none")
    return src, base / "modelopt", base / "ours"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_modelopt_export_is_valid_and_fully_matched(moe):
    _, ref, _ = moe
    r = cli("validate", ref, "--json")
    assert r.returncode == 0, r.stdout
    report = json.loads(r.stdout)
    assert report["ok"] and report["format"] == "modelopt"
    assert report["fused_groups"]["gate/up"] == {
        **report["fused_groups"]["gate/up"],
        "total": 8,
        "matched": 8,
        "verdict": "perfect",
    }
    text = cli("validate", ref).stdout
    assert "Matched pairs: 8/8" in text and "Mismatched pairs: 0/8" in text and "PERFECTLY MATCHED" in text


def test_our_output_is_valid(moe):
    assert validate(moe[2]).ok


def test_changed_expert_up_scale_is_named(moe, tmp_path):
    bad = _copy(moe[1], tmp_path / "bad")
    name = "model.layers.1.mlp.experts.2.up_proj.weight_scale_2"
    value = load_dir(bad)[name]
    rewrite_tensor(bad, name, value * 1.5)
    r = cli("validate", bad)
    assert r.returncode == 1
    assert "Mismatched pairs: 1/8" in r.stdout
    assert "model.layers.1.mlp.experts.2" in r.stdout
    assert "1.5" in r.stdout  # the ratio of the mismatched pair


def test_compressed_tensors_per_member_scales_are_counted(tmp_path):
    src = make_model_checkpoint(tmp_path / "src", "deepseek_v3", n_shards=2)
    ct = compressed_tensors_nvfp4a16(src, tmp_path / "ct")
    report = validate(ct)
    assert report.format == "compressed-tensors" and report.quant_algo == "NVFP4A16"
    gate_up, mla = report.groups["gate/up"], report.groups["q_a/kv_a"]
    # 1 dense MLP + 2 MoE layers x (1 shared + 4 routed): each member got its own global scale.
    assert gate_up.total == 11 and gate_up.matched == 0
    assert mla.total == 3 and mla.matched == 0
    assert not report.ok
    assert not [f for f in report.findings if f.check in ("tensors", "exclusions", "index", "config")], report.findings


def test_missing_expert_input_scale(moe, tmp_path):
    bad = _copy(moe[2], tmp_path / "bad")
    rewrite_tensor(bad, "model.layers.0.mlp.experts.1.down_proj.input_scale", None)
    report = validate(bad)
    messages = [f.message for f in report.findings if f.level == "error"]
    assert any("model.layers.0.mlp.experts.1.down_proj.input_scale is missing" in m for m in messages)
    assert any("omits" in m or "not in the named shard" in m for m in messages)  # the index still lists it


def test_index_entry_for_missing_tensor(moe, tmp_path):
    bad = _copy(moe[2], tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.mlp.experts.9.up_proj.weight"] = shard
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    r = cli("validate", bad)
    assert r.returncode == 1
    assert "lists 1 tensor(s) not in the named shard, e.g. model.layers.0.mlp.experts.9.up_proj.weight" in r.stdout


def test_exclude_list_omitting_an_unquantized_linear(moe, tmp_path):
    bad = _copy(moe[2], tmp_path / "bad")
    hf = json.loads((bad / "hf_quant_config.json").read_text())
    hf["quantization"]["exclude_modules"] = [e for e in hf["quantization"]["exclude_modules"] if e != "lm_head"]
    (bad / "hf_quant_config.json").write_text(json.dumps(hf))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = hf["quantization"]["exclude_modules"]
    (bad / "config.json").write_text(json.dumps(cfg))
    report = validate(bad)
    assert not report.ok
    assert any(f.check == "consumer" and f.message.startswith("lm_head: vLLM builds it NVFP4") for f in report.findings)


def test_stale_quantization_config_and_missing_keys(moe, tmp_path):
    bad = _copy(moe[2], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (bad / "config.json").write_text(json.dumps(cfg))
    hf = json.loads((bad / "hf_quant_config.json").read_text())
    del hf["quantization"]["kv_cache_quant_algo"]
    (bad / "hf_quant_config.json").write_text(json.dumps(hf))
    messages = [f.message for f in validate(bad).findings]
    assert any("stale quantization_config" in m for m in messages)
    assert any("kv_cache_quant_algo" in m for m in messages)


def test_scale_for_unquantized_module_and_nan_scale(moe, tmp_path):
    bad = _copy(moe[2], tmp_path / "bad")
    rewrite_tensor(bad, "model.layers.0.self_attn.o_proj.weight_scale_2", torch.tensor(float("nan")))
    rewrite_tensor(bad, "lm_head.weight_scale_2", torch.tensor(1.0), beside="lm_head.weight")
    messages = [f.message for f in validate(bad).findings if f.level == "error"]
    assert any("o_proj.weight_scale_2 = nan" in m for m in messages)
    assert any("lm_head.weight_scale_2: scale tensor for a module that keeps its BF16 weight" in m for m in messages)


def test_tp_check(moe):
    # Qwen3-MoE tiny experts have input dim 32 in down_proj: TP 2 gives 16 per rank, TP 4 gives 8.
    assert validate(moe[2], tp=2).ok
    report = validate(moe[2], tp=4)
    assert not report.ok and any(f.check == "tp" and "down_proj" in f.message for f in report.findings)


def test_compare_weights_ours_vs_modelopt(moe):
    src, ref, ours = moe
    r = cli("compare-weights", ours, ref, "--source", src, "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 0
    assert d["compared"] == 32 and d["identical"] == 32 and d["packed_bytes_identical_share"] == 1.0
    assert d["input_scale"] == {"differs": 32}  # ModelOpt calibrated, ours 1.0
    assert not d["tensors_only_in_a"] and not d["tensors_only_in_b"]
    for e in d["quantization_error_by_kind"].values():
        assert e["a_rel_mse"] == e["b_rel_mse"] and 10 < e["a_snr_db"] < 30
    text = cli("compare-weights", ours, ref).stdout
    assert "identical modules (packed bytes, block scales, weight_scale_2): 32/32" in text
    assert "expected between a calibrated and an uncalibrated checkpoint" in text


def test_compare_weights_finds_differences(moe, tmp_path):
    bad = _copy(moe[2], tmp_path / "bad")
    name = "model.layers.1.self_attn.q_proj.weight"
    w = load_dir(bad)[name].clone()
    w[0, :4] ^= 0x11
    rewrite_tensor(bad, name, w)
    r = cli("compare-weights", moe[2], bad, "--tensor", "*self_attn*", "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 1 and d["compared"] == 8 and d["identical"] == 7
    assert d["differing_modules"] == ["model.layers.1.self_attn.q_proj"]


def test_compare_scales_with_plot(moe, tmp_path):
    png = tmp_path / "scales.png"
    r = cli("compare-scales", moe[2], moe[1], "--plot", png, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ws2 = d["a"]["weight_scale_2"]["routed_expert"]
    assert ws2["count"] == 24 and 0 < ws2["min"] <= ws2["p50"] <= ws2["max"]
    assert d["distance"]["weight_scale_2_ks"]["routed_expert"] == 0.0  # same bf16 source, same scales
    assert d["a"]["input_scale"]["attention"]["min"] == 1.0
    text = cli("compare-scales", moe[2]).stdout
    assert "weight_scale_2 (global, float32 scalar) [routed_expert]:" in text and "Count: 24" in text


def test_doctor_without_gpu_or_vllm(moe):
    r = cli("doctor", moe[2])
    assert r.returncode == 0
    assert "vLLM" in r.stdout and "GPU" in r.stdout and "cublasLt.h" in r.stdout
    assert "tp 2: ok" in r.stdout and "tp 4: no" in r.stdout


def test_known_bad_vllm_versions():
    from modelopt_streaming.validate.doctor import known_issues_for

    assert known_issues_for("vllm", "0.16.0rc1.dev118+g1234")
    assert known_issues_for("vllm", "0.16.0rc1.dev200")
    assert not known_issues_for("vllm", "0.16.0rc1.dev78+gb6bb2842c")
    assert not known_issues_for("vllm", "0.15.1")


def test_example_scripts_take_paths(moe, tmp_path):
    from pathlib import Path

    examples = Path(__file__).parents[2] / "examples"
    r = subprocess.run(
        [sys.executable, examples / "validate_gate_up_matching.py", moe[2]], capture_output=True, text=True
    )
    assert r.returncode == 0 and "Matched pairs: 8/8" in r.stdout
    r = subprocess.run(
        [sys.executable, examples / "compare_weight_values.py", moe[2], moe[1]], capture_output=True, text=True
    )
    assert r.returncode == 0 and "32/32" in r.stdout
    r = subprocess.run([sys.executable, examples / "compare_scales.py", moe[2]], capture_output=True, text=True)
    assert r.returncode == 0 and "weight_scale_2" in r.stdout


# Outputs of this tool before its exclusions followed vLLM's names: the list it wrote then, and the layer
# vLLM builds NVFP4 for bf16 tensors (tests/test_consumer_vllm.py shows vLLM itself doing so).
EARLIER_OUTPUTS = {
    "tied embedding": ("llama", True, {}, lambda ex: [e for e in ex if e != "lm_head"], "lm_head"),
    "llama --exclude '*.k_proj'": (
        "llama",
        False,
        {"exclude": ["*.k_proj"]},
        lambda ex: [e for e in ex if not e.endswith("qkv_proj")],
        "model.layers.0.self_attn.qkv_proj",
    ),
    "deepseek --exclude '*.q_a_proj'": (
        "deepseek_v3",
        False,
        {"exclude": ["*.q_a_proj"]},
        lambda ex: [e for e in ex if not e.endswith("fused_qkv_a_proj")],
        "model.layers.0.self_attn.fused_qkv_a_proj",
    ),
}


@pytest.mark.parametrize("case", list(EARLIER_OUTPUTS))
def test_earlier_outputs_fail_validate_naming_the_layer(case, tmp_path):
    arch, tied, kwargs, edit, layer = EARLIER_OUTPUTS[case]
    make = make_tied_checkpoint if tied else make_model_checkpoint
    src = make(tmp_path / "src", arch)
    out = tmp_path / "out"
    quantize(src, out, progress="none", **kwargs)
    assert validate(out).ok  # today's list
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["quantization"]["exclude_modules"] != edit(hf["quantization"]["exclude_modules"])
    hf["quantization"]["exclude_modules"] = edit(hf["quantization"]["exclude_modules"])
    (out / "hf_quant_config.json").write_text(json.dumps(hf))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = hf["quantization"]["exclude_modules"]
    (out / "config.json").write_text(json.dumps(cfg))
    r = cli("validate", out)
    assert r.returncode == 1
    assert f"[consumer] {layer}" in r.stdout and "vLLM builds it NVFP4" in r.stdout, r.stdout
    assert "add '" in r.stdout  # the fix
    doctor = cli("doctor", out)
    assert "INVALID" in doctor.stdout and layer in doctor.stdout


def test_unknown_architecture_gets_a_list_exact_with_and_without_fusion(tmp_path, caplog):
    """No consumer rule for the class: the list must hold whether vLLM fuses q/k/v or not."""
    from modelopt_streaming.consumers import GENERIC, UNFUSED, VllmExclusion, consumer_layers

    src = make_model_checkpoint(tmp_path / "src", "llama")
    config = json.loads((src / "config.json").read_text())
    config["architectures"], config["model_type"] = ["SomethingNewForCausalLM"], "something_new"
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="modelopt_streaming")
    quantize(src, out, exclude=["*.layers.0.self_attn.k_proj"], progress="none")
    assert any("SomethingNewForCausalLM is not in the vLLM consumer table" in line for line in caplog.messages)
    exclude = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    # Hand-computed: layer 0's q/k/v stay bf16 (one member excluded), named both ways; lm_head listed.
    assert "model.layers.0.self_attn.qkv_proj" in exclude and "lm_head" in exclude
    for name in ("q_proj", "k_proj", "v_proj"):
        assert VllmExclusion(exclude, UNFUSED).excluded(f"model.layers.0.self_attn.{name}")
    fused = VllmExclusion(exclude, GENERIC, config)
    assert fused.excluded("model.layers.0.self_attn.qkv_proj")
    assert not fused.excluded("model.layers.1.self_attn.qkv_proj")
    assert not fused.excluded("model.layers.0.self_attn.o_proj")
    names = [k.removesuffix(".weight") for k in load_dir(src) if k.endswith("proj.weight")]
    assert {lay.prefix for lay in consumer_layers(names, config, GENERIC)} >= {"model.layers.0.self_attn.qkv_proj"}
    report = validate(out)
    assert report.ok
    assert any(f.check == "consumer" and "not in the consumer table" in f.message for f in report.findings)
