"""The command line, as a user runs it."""

import json
import subprocess
import sys

import pytest
from checkpoints import make_model_checkpoint


def cli(*args, check=False):
    return subprocess.run(
        [sys.executable, "-m", "modelopt_streaming", *map(str, args)], capture_output=True, text=True, check=check
    )


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_model_checkpoint(tmp_path_factory.mktemp("cli") / "src", "deepseek_v3", n_shards=3)


def test_dry_run_prints_plan_and_writes_nothing(src, tmp_path):
    out = tmp_path / "out"
    r = cli("quantize", "--input-dir", src, "--output_dir", out, "--mlp-only", "--dry_run")
    assert r.returncode == 0, r.stderr
    assert "fused groups: gate/up: 11" in r.stdout
    assert "outside --mlp_only scope: 15" in r.stdout
    assert "MTP layer" in r.stdout and "MoE router: 2" in r.stdout
    assert not out.exists()


def test_both_spellings_and_summary(src, tmp_path):
    out = tmp_path / "out"
    r = cli(
        "quantize",
        "--input_dir",
        src,
        "--output-dir",
        out,
        "--max-shard-size",
        "20KB",
        "--scale-math",
        "cpu",
        "--device",
        "cpu",
        "--exclude",
        "model.layers.2.mlp.shared_experts*",
        "--weight-only",
    )
    assert r.returncode == 0, r.stderr
    assert "fused groups: gate/up: 10" in r.stdout
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "W4A16_NVFP4"
    assert "not calibrated" not in r.stderr


def test_uncalibrated_activation_note(src, tmp_path):
    r = cli("quantize", "--input_dir", src, "--output_dir", tmp_path / "out")
    assert r.returncode == 0
    assert r.stderr.count("activation scales are not calibrated") == 1


def test_quiet_prints_no_progress(src, tmp_path):
    r = cli("quantize", "--input_dir", src, "--output_dir", tmp_path / "out", "--quiet")
    assert r.returncode == 0 and r.stderr == ""


@pytest.mark.parametrize("case", ["inside_input", "same_as_input", "not_empty", "no_input", "both_scopes"])
def test_refusals(src, tmp_path, case):
    out = tmp_path / "out"
    args = ["quantize", "--input_dir", src, "--output_dir", out]
    if case == "inside_input":
        args[-1] = src / "nvfp4"
    elif case == "same_as_input":
        args[-1] = src
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    elif case == "no_input":
        args[2] = tmp_path / "missing"
    elif case == "both_scopes":
        args += ["--mlp_only", "--experts_only"]
    before = sorted(p.name for p in src.iterdir())
    r = cli(*args)
    assert r.returncode == 2 if case != "no_input" else r.returncode == 1
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2
    assert sorted(p.name for p in src.iterdir()) == before
    if case == "not_empty":
        assert (out / "keep.txt").read_text() == "user data" and not (out / "hf_quant_config.json").exists()


def test_bad_size_is_a_usage_error(src, tmp_path):
    r = cli("quantize", "--input_dir", src, "--output_dir", tmp_path / "o", "--max_shard_size", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr
