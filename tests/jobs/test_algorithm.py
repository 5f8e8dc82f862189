"""``quantize --algorithm mse`` end to end: a valid NVFP4 checkpoint in either dialect whose every block
dequantizes no worse than rtn's, the same global scales, the algorithm in the provenance, the summary and the
resume fingerprint; every path that encodes units (stream, calibrated live layers, torchrun ranks, 3-D experts)
takes it."""

from __future__ import annotations

import filecmp
import json
import logging
import re

import pytest
import torch
from checkpoints import load_dir, make_model_checkpoint
from checkpoints_extra import make_gpt_oss_checkpoint
from forkrun import tree_hashes
from safetensors.torch import save_file
from test_scaleout import quantize_cli

import modelopt_streaming
from modelopt_streaming import cli
from modelopt_streaming.codec import mse, nvfp4
from modelopt_streaming.errors import OutputStateError, UsageError
from modelopt_streaming.jobs.quantize_job import QuantizeOptions
from modelopt_streaming.validate import validate

QUIET = {"progress": "none", "device": "cpu"}


def _block_error(weight: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    d = weight.float().reshape(weight.shape[0], -1, 16) - decoded.reshape(weight.shape[0], -1, 16)
    s = d * d
    while s.shape[-1] > 1:
        s = s[..., 0::2] + s[..., 1::2]
    return s[..., 0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("algorithm")
    src = make_model_checkpoint(base / "src", "llama")
    rtn = modelopt_streaming.quantize(src, base / "rtn", **QUIET)
    ours = modelopt_streaming.quantize(src, base / "mse", algorithm="mse", **QUIET)
    ct = modelopt_streaming.quantize(src, base / "mse-ct", algorithm="mse", format="compressed-tensors", **QUIET)
    return src, base, {"rtn": rtn, "mse": ours, "mse-ct": ct}


def _modules(out: dict) -> list[str]:
    return sorted(n.removesuffix(".weight_scale_2") for n in out if n.endswith(".weight_scale_2"))


def test_valid_and_never_worse_than_rtn_per_block(runs):
    src, base, _ = runs
    assert validate(base / "mse").ok, validate(base / "mse").text()
    source, rtn, ours = load_dir(src), load_dir(base / "rtn"), load_dir(base / "mse")
    assert sorted(rtn) == sorted(ours)
    modules = _modules(rtn)
    assert len(modules) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    better = total = 0
    for m in modules:
        assert torch.equal(ours[f"{m}.weight_scale_2"], rtn[f"{m}.weight_scale_2"]), m
        assert torch.equal(ours[f"{m}.input_scale"], rtn[f"{m}.input_scale"]), m
        w, s2 = source[f"{m}.weight"], rtn[f"{m}.weight_scale_2"]
        e_rtn = _block_error(w, nvfp4.dequantize(rtn[f"{m}.weight"], rtn[f"{m}.weight_scale"], s2))
        e_mse = _block_error(w, nvfp4.dequantize(ours[f"{m}.weight"], ours[f"{m}.weight_scale"], s2))
        assert (e_mse <= e_rtn).all(), m
        better += int((e_mse < e_rtn).sum())
        total += e_rtn.numel()
        # The codec's own answer for the module against its group's global scale: the stream changed nothing.
        packed, scales = mse.quantize(w, s2)
        assert torch.equal(packed, ours[f"{m}.weight"]), m
        assert torch.equal(scales.view(torch.uint8), ours[f"{m}.weight_scale"].view(torch.uint8)), m
    assert better > total // 4
    # Everything that is not a quantized weight is rtn's, byte for byte.
    searched = {f"{m}.{leaf}" for m in modules for leaf in ("weight", "weight_scale")}
    for name in sorted(set(rtn) - searched):
        assert torch.equal(rtn[name], ours[name]), name


def test_compressed_tensors_dialect_same_codes(runs):
    _, base, summaries = runs
    assert validate(base / "mse-ct").ok
    mo, ct = load_dir(base / "mse"), load_dir(base / "mse-ct")
    for m in _modules(mo):
        assert torch.equal(ct[f"{m}.weight_packed"], mo[f"{m}.weight"]), m
        assert torch.equal(ct[f"{m}.weight_scale"].view(torch.uint8), mo[f"{m}.weight_scale"].view(torch.uint8)), m
    record = json.loads((base / "mse-ct" / "modelopt_streaming.json").read_text())
    assert record["options"]["algorithm"] == "mse" and record["options"]["format"] == "compressed-tensors"
    assert summaries["mse-ct"].algorithm == "mse"


def test_convert_between_dialects_keeps_the_mse_bytes(runs, tmp_path):
    """``convert`` moves codes and scales without looking at how they were chosen: the mse compressed-tensors
    output converts to the mse ModelOpt output's files."""
    _, base, _ = runs
    modelopt_streaming.convert(base / "mse-ct", tmp_path / "mo", "modelopt")
    names = sorted(p.name for p in (base / "mse").iterdir() if p.suffix == ".safetensors")
    names += ["config.json", "hf_quant_config.json", "model.safetensors.index.json"]
    assert all(filecmp.cmp(base / "mse" / n, tmp_path / "mo" / n, shallow=False) for n in names)


def test_provenance_summary_and_json_report_the_algorithm(runs, tmp_path, capsys):
    src, base, summaries = runs
    record = json.loads((base / "mse" / "modelopt_streaming.json").read_text())
    assert record["options"]["algorithm"] == "mse"
    assert record["options"]["algorithm_settings"] == {
        "scales_below": mse.DEFAULT_BELOW,
        "scales_above": mse.DEFAULT_ABOVE,
        "global_scale_search": False,
    }
    rtn_record = json.loads((base / "rtn" / "modelopt_streaming.json").read_text())
    assert rtn_record["options"]["algorithm"] == "rtn" and rtn_record["options"]["algorithm_settings"] == {}
    assert summaries["mse"].algorithm == "mse" and summaries["rtn"].algorithm == "rtn"
    assert "algorithm: mse (scales_below 2, scales_above 6, global_scale_search False)" in summaries["mse"].lines()
    assert cli.main(["quantize", "--input_dir", str(src), "--dry_run", "--algorithm", "mse", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and report["algorithm"] == "mse"
    assert report["algorithm_settings"]["scales_above"] == mse.DEFAULT_ABOVE
    assert not (tmp_path / "nothing").exists()


def test_resume_with_another_algorithm_is_refused(runs):
    src, base, _ = runs
    before = tree_hashes(base / "mse")
    with pytest.raises(OutputStateError, match="options changed.*algorithm"):
        modelopt_streaming.quantize(src, base / "mse", resume=True, **QUIET)
    with pytest.raises(OutputStateError, match="options changed.*algorithm"):
        modelopt_streaming.quantize(src, base / "rtn", resume=True, algorithm="mse", **QUIET)
    assert tree_hashes(base / "mse") == before
    # The same algorithm resumes (a finished directory: nothing left to write, same files).
    modelopt_streaming.quantize(src, base / "mse", resume=True, algorithm="mse", **QUIET)
    assert tree_hashes(base / "mse") == before


def test_unknown_algorithm_is_a_usage_error():
    with pytest.raises(UsageError, match="--algorithm"):
        QuantizeOptions(algorithm="gptq-ish")


def test_calibrated_run_quantizes_live_layers_with_mse(runs, tmp_path, caplog):
    """A calibrated run writes each layer's units from the tensors its forward read: the weights are those of
    the plain mse run (only the input scales are the calibration's)."""
    pytest.importorskip("transformers")
    src, base, _ = runs
    rows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": rows}, tmp_path / "rows.safetensors")
    with caplog.at_level(logging.INFO, logger="modelopt_streaming"):
        summary = modelopt_streaming.quantize(
            src, tmp_path / "calibrated", algorithm="mse", calib_data=tmp_path / "rows.safetensors", **QUIET
        )
    assert summary.algorithm == "mse"
    live = re.search(r"(\d+) units written from the calibration's tensors", caplog.text)
    assert live and int(live.group(1)) > 0, caplog.text
    plain, calibrated = load_dir(base / "mse"), load_dir(tmp_path / "calibrated")
    for m in _modules(plain):
        for leaf in ("weight", "weight_scale", "weight_scale_2"):
            a, b = plain[f"{m}.{leaf}"], calibrated[f"{m}.{leaf}"]
            if a.dtype == torch.float8_e4m3fn:
                a, b = a.view(torch.uint8), b.view(torch.uint8)
            assert torch.equal(a, b), f"{m}.{leaf}"


def test_fused_3d_experts_take_mse(tmp_path):
    src = make_gpt_oss_checkpoint(tmp_path / "src", n_shards=2)
    modelopt_streaming.quantize(src, tmp_path / "rtn", **QUIET)
    modelopt_streaming.quantize(src, tmp_path / "mse", algorithm="mse", **QUIET)
    assert validate(tmp_path / "mse").ok
    source, rtn, ours = load_dir(src), load_dir(tmp_path / "rtn"), load_dir(tmp_path / "mse")
    cubes = [n.removesuffix("_weight_scale_2") for n in rtn if n.endswith("experts.gate_up_proj_weight_scale_2")]
    assert cubes
    changed = 0
    for name in cubes:
        s2 = rtn[f"{name}_weight_scale_2"]
        assert torch.equal(s2, ours[f"{name}_weight_scale_2"])
        for e in range(source[name].shape[0]):
            w = source[name][e].t().contiguous()  # [out, in]: blocks along in

            def decode(out, e=e, s2=s2, name=name):
                return nvfp4.dequantize(out[name][e].t().contiguous(), out[f"{name}_weight_scale"][e].t(), s2)

            e_rtn, e_mse = _block_error(w, decode(rtn)), _block_error(w, decode(ours))
            assert (e_mse <= e_rtn).all()
            changed += int((e_mse < e_rtn).sum())
    assert changed > 0


@pytest.mark.slow
def test_torchrun_two_processes_write_the_single_process_files(runs, tmp_path):
    src, base, _ = runs
    quantize_cli(src, tmp_path / "two", "--algorithm", "mse", "--device", "cpu", torchrun=True)
    assert tree_hashes(tmp_path / "two") == tree_hashes(base / "mse")
