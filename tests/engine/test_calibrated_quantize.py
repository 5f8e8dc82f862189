"""``quantize --calib_data``: the whole output equals NVIDIA ModelOpt's calibrated export byte for byte (every
weight, block scale, global scale and now every input_scale), for every family the engine runs; the output
validates, and bad calibration data is refused before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from checkpoints import load_dir
from engine_oracle import ARCHS, make_source, token_rows
from safetensors.torch import save_file
from test_calibration_modelopt import modelopt_calibrated_export

import modelopt_streaming
from modelopt_streaming.validate import validate


def _same_tensors(ref: dict, ours: dict) -> int:
    """Every tensor of ModelOpt's export equals ours byte for byte; returns how many input scales compared. We
    also copy what transformers drops on loading (DeepSeek's MTP layer 3 of this tiny model), nothing else."""
    assert set(ref) <= set(ours)
    assert all(".layers.3." in n for n in set(ours) - set(ref)), sorted(set(ours) - set(ref))[:4]
    inputs = 0
    for name, a in ref.items():
        b = ours[name]
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert a.dtype == b.dtype and torch.equal(a, b), name
        inputs += name.endswith("input_scale")
    return inputs


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrated_output_equals_modelopt(tmp_path, arch):
    src = make_source(tmp_path / "src", arch)
    rows = token_rows(256, rows=3)
    save_file({"input_ids": rows}, tmp_path / "rows.safetensors")
    ref = modelopt_calibrated_export(src, tmp_path / "modelopt", rows, kv=False)
    summary = modelopt_streaming.quantize(
        src, tmp_path / "ours", calib_data=tmp_path / "rows.safetensors", scale_math="cpu", device="cpu"
    )
    assert _same_tensors(ref, load_dir(tmp_path / "ours")) >= 8
    assert summary.input_scales_missing == []
    assert summary.calibration["data"]["rows"] == 3 and summary.calibration["tokens"] == 48
    assert validate(tmp_path / "ours").ok
    record = json.loads((tmp_path / "ours" / "modelopt_streaming.json").read_text())
    assert record["calibration"]["data"]["sha256"] == summary.calibration["data"]["sha256"]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_float32_calibration_equals_modelopt_on_the_float32_model(tmp_path, arch):
    """``calib_dtype="float32"``: a float32 checkpoint run as stored gives ModelOpt's input scales of the same
    model loaded in float32, bit for bit (and not the bf16 run's)."""
    from safetensors.torch import load_file

    src = make_source(tmp_path / "src", arch)
    for shard in src.glob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    rows = token_rows(256, rows=3)
    save_file({"input_ids": rows}, tmp_path / "rows.safetensors")
    ref = modelopt_calibrated_export(src, tmp_path / "modelopt", rows, kv=False, dtype=torch.float32)
    common = dict(calib_data=tmp_path / "rows.safetensors", scale_math="cpu", device="cpu", progress="none")
    ours = load_dir(modelopt_streaming.quantize(src, tmp_path / "f32", calib_dtype="float32", **common).output_dir)
    bf16 = load_dir(modelopt_streaming.quantize(src, tmp_path / "bf16", **common).output_dir)
    scales = [n for n in ref if n.endswith("input_scale")]
    assert len(scales) >= 8
    for name in scales:
        assert torch.equal(ref[name], ours[name]), name
    assert any(not torch.equal(ref[n], bf16[n]) for n in scales)


def test_the_command_line_calibrates_and_reports(tmp_path):
    src = make_source(tmp_path / "src", "qwen3_moe")
    save_file({"input_ids": token_rows(256, rows=2)}, tmp_path / "rows.safetensors")
    args = ["--input_dir", src, "--output_dir", tmp_path / "out", "--calib_data", tmp_path / "rows.safetensors"]
    r = subprocess.run(
        [sys.executable, "-m", "modelopt_streaming", "quantize", *map(str, args), "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)["calibration"]
    assert sorted(report["tokens_per_expert"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(sum(v) == 2 * 16 * 2 for v in report["tokens_per_expert"].values())  # top-2 of 32 tokens
    assert "input scales: calibrated on 2 x 16 tokens" in r.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("outside the vocabulary", "outside the vocabulary"),
        ("text without a tokenizer", "has no tokenizer"),
        ("architecture", "the engine does not run"),
    ],
)
def test_bad_calibration_input_writes_nothing(tmp_path, case, message):
    src = make_source(tmp_path / "src", "llama")
    data = tmp_path / "rows.safetensors"
    save_file({"input_ids": token_rows(256, rows=2)}, data)
    if case == "outside the vocabulary":
        save_file({"input_ids": torch.full((2, 8), 999)}, data)
    elif case == "text without a tokenizer":
        data = tmp_path / "data.txt"
        data.write_text("some text")
    else:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelopt_streaming",
            "quantize",
            "--input_dir",
            str(src),
            "--output_dir",
            str(out),
            "--calib_data",
            str(data),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_kv_cache_equals_modelopt(tmp_path, arch):
    """``--kv_cache fp8``: every tensor of ModelOpt's export with its data-calibrated FP8_KV_CFG (k_scale and
    v_scale of each attention layer too, MLA included) and its configs' KV entries."""
    src = make_source(tmp_path / "src", arch)
    rows = token_rows(256, rows=3)
    save_file({"input_ids": rows}, tmp_path / "rows.safetensors")
    ref = modelopt_calibrated_export(src, tmp_path / "modelopt", rows, kv=True)
    modelopt_streaming.quantize(
        src,
        tmp_path / "ours",
        calib_data=tmp_path / "rows.safetensors",
        kv_cache="fp8",
        scale_math="cpu",
        device="cpu",
    )
    ours = load_dir(tmp_path / "ours")
    _same_tensors(ref, ours)
    assert sum(n.endswith(("k_proj.k_scale", "v_proj.v_scale")) for n in ours) == 2 * (3 if "deepseek" in arch else 2)

    def configs(d):
        hf = json.loads((d / "hf_quant_config.json").read_text())["quantization"]
        return hf["kv_cache_quant_algo"], json.loads((d / "config.json").read_text())["quantization_config"]

    (ref_algo, ref_cfg), (our_algo, our_cfg) = configs(tmp_path / "modelopt"), configs(tmp_path / "ours")
    assert ref_algo == our_algo == "FP8"
    assert our_cfg["kv_cache_scheme"] == ref_cfg["kv_cache_scheme"]
    assert list(our_cfg) == list(ref_cfg)
    assert validate(tmp_path / "ours").ok


def test_fp8_cast_writes_the_config_and_no_scales(tmp_path):
    src = make_source(tmp_path / "src", "llama")
    modelopt_streaming.quantize(src, tmp_path / "out", kv_cache="fp8_cast", device="cpu")
    hf = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert hf["kv_cache_quant_algo"] == "FP8"
    assert config["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert not [n for n in load_dir(tmp_path / "out") if n.endswith(("k_scale", "v_scale"))]
    assert validate(tmp_path / "out").ok


def test_validate_checks_the_kv_cache_scales(tmp_path):
    from checkpoints import rewrite_tensor

    src = make_source(tmp_path / "src", "llama")
    save_file({"input_ids": token_rows(256, rows=2)}, tmp_path / "rows.safetensors")
    out = tmp_path / "out"
    modelopt_streaming.quantize(src, out, calib_data=tmp_path / "rows.safetensors", kv_cache="fp8", device="cpu")
    assert validate(out).ok
    rewrite_tensor(out, "model.layers.1.self_attn.v_proj.v_scale", None)
    rewrite_tensor(out, "model.layers.0.self_attn.k_proj.k_scale", torch.tensor(float("nan")))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.self_attn.v_proj.v_scale"]
    index["metadata"]["total_size"] -= 4
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    report = validate(out)
    errors = [f.message for f in report.findings if f.level == "error" and f.check == "kv_cache"]
    assert not report.ok
    assert any("model.layers.1.self_attn.v_proj.v_scale is missing" in e for e in errors), errors
    assert any("model.layers.0.self_attn.k_proj.k_scale = nan" in e for e in errors), errors


@pytest.mark.parametrize("arch, scope", [("llama", {}), ("qwen3_moe", {}), ("deepseek_v3", {"mlp_only": True})])
def test_a_calibrated_run_reads_the_source_once(tmp_path, arch, scope):
    """Every source byte is read once: each layer's units (quantized and copied) are written from the tensors
    the calibration's forward read; the stream reads only what no forward needs (lm_head, the MTP layer)."""
    from modelopt_streaming.source.index import build_index

    src = make_source(tmp_path / "src", arch)
    save_file({"input_ids": token_rows(256, rows=2)}, tmp_path / "rows.safetensors")
    summary = modelopt_streaming.quantize(
        src, tmp_path / "out", calib_data=tmp_path / "rows.safetensors", device="cpu", **scope
    )
    source_bytes = sum(t.nbytes for t in build_index(src).tensors.values())
    assert summary.source_bytes_read == source_bytes
    plain = modelopt_streaming.quantize(src, tmp_path / "plain", device="cpu", **scope)
    assert plain.source_bytes_read == source_bytes
    ours, reference = load_dir(tmp_path / "out"), load_dir(tmp_path / "plain")
    assert sorted(ours) == sorted(reference)
    for name, t in reference.items():  # the uncalibrated run's bytes, input_scale aside
        if not name.endswith("input_scale"):
            a, b = (x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x for x in (t, ours[name]))
            assert torch.equal(a, b), name


@pytest.mark.parametrize("encoding", ["deepseek_fp8", "kimi_int4"])
def test_vendor_encoded_sources_calibrate_as_their_bf16_values(tmp_path, encoding):
    """DeepSeek's block FP8 and Kimi's INT4-packed experts run through the engine decoded as the reader decodes
    them: the calibrated output equals that of the bf16 checkpoint holding the decoded values, and the
    encoded source is read once."""
    from checkpoints import write_checkpoint
    from checkpoints_extra import deepseek_fp8_checkpoint, kimi_int4_checkpoint

    from modelopt_streaming.source.index import build_index

    make = {"deepseek_fp8": deepseek_fp8_checkpoint, "kimi_int4": kimi_int4_checkpoint}[encoding]
    src, decoded = make(tmp_path / "src")
    tensors = load_dir(src)
    plain = dict(decoded)
    for name, t in tensors.items():
        if (
            name not in decoded
            and not name.endswith("_scale_inv")
            and f"{name.rsplit('.', 1)[0]}.weight" not in decoded
        ):
            plain[name] = t  # not one of an encoding's parts
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    twin = write_checkpoint(tmp_path / "twin", plain, config)
    save_file({"input_ids": token_rows(256, rows=2)}, tmp_path / "rows.safetensors")
    rows = tmp_path / "rows.safetensors"
    summary = modelopt_streaming.quantize(src, tmp_path / "out", calib_data=rows, device="cpu", mlp_only=True)
    modelopt_streaming.quantize(twin, tmp_path / "out_twin", calib_data=rows, device="cpu", mlp_only=True)
    ours, theirs = load_dir(tmp_path / "out"), load_dir(tmp_path / "out_twin")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        a, b = (x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x for x in (t, ours[name]))
        assert torch.equal(a, b), name
    assert summary.source_bytes_read == sum(t.nbytes for t in build_index(src).tensors.values())


def test_device_auto_calibrates(tmp_path):
    """``--device auto`` (CUDA when available) is a device the calibration's resume key must resolve, not parse."""
    src = make_source(tmp_path / "src", "llama")
    save_file({"input_ids": token_rows(256, rows=1)}, tmp_path / "rows.safetensors")
    summary = modelopt_streaming.quantize(
        src, tmp_path / "out", calib_data=tmp_path / "rows.safetensors", device="auto"
    )
    assert summary.calibration["engine"]["device"] in ("cpu", "cuda") and validate(tmp_path / "out").ok


def test_hidden_states_spilled_to_a_file_calibrate_to_the_same_bytes(tmp_path, monkeypatch):
    """With no host memory for hidden states (--calib_host_budget 0) every layer boundary lives in a
    memory-mapped file in the temp directory: the output is byte for byte the in-memory run's, and the spill
    files are gone afterwards."""
    import tempfile

    from modelopt_streaming.engine import hidden

    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    made = []
    original = hidden.HiddenStore.__init__

    def recording(self, *a, **kw):
        original(self, *a, **kw)
        made.append(self.spilled)

    monkeypatch.setattr(hidden.HiddenStore, "__init__", recording)
    src = make_source(tmp_path / "src", "qwen3_moe")
    save_file({"input_ids": token_rows(256, rows=3)}, tmp_path / "rows.safetensors")
    rows = tmp_path / "rows.safetensors"
    modelopt_streaming.quantize(src, tmp_path / "memory", calib_data=rows, device="cpu", calib_batch_size=2)
    assert made and not any(made)
    made.clear()
    modelopt_streaming.quantize(
        src, tmp_path / "spilled", calib_data=rows, device="cpu", calib_batch_size=2, calib_host_budget=0
    )
    assert made and all(made)
    assert list(spill.glob("hidden-*")) == []
    a, b = load_dir(tmp_path / "memory"), load_dir(tmp_path / "spilled")
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in (a[name], b[name]))
        assert torch.equal(x, y), name


def test_calib_host_budget_needs_calibration_data():
    from modelopt_streaming import QuantizeOptions
    from modelopt_streaming.errors import UsageError

    with pytest.raises(UsageError, match="--calib_host_budget"):
        QuantizeOptions(calib_host_budget=1 << 30)
    with pytest.raises(UsageError, match="--calib_host_budget must not be negative"):
        QuantizeOptions(calib_data="rows.safetensors", calib_host_budget=-1)
