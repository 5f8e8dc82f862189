"""Same bytes whatever runs the job: fused or reference codec, one process or torchrun's two."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import make_model_checkpoint


def tree(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_model_checkpoint(tmp_path_factory.mktemp("scale") / "src", "deepseek_v3", n_shards=3)


@pytest.fixture(scope="module")
def single(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelopt_streaming",
            "quantize",
            "--input_dir",
            src,
            "--output_dir",
            out,
            "--max_shard_size",
            "30KB",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    files = tree(out)
    assert sum(f.startswith("model-") for f in files) >= 6
    return files


def test_reference_codec_gives_the_same_files(src, single, tmp_path):
    env = {**os.environ, "MODELOPT_STREAMING_CODEC": "reference"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelopt_streaming",
            "quantize",
            "--input_dir",
            src,
            "--output_dir",
            tmp_path / "out",
            "--max_shard_size",
            "30KB",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "codec: torch reference codec on cpu" in r.stderr
    assert tree(tmp_path / "out") == single


def test_torchrun_two_processes_gives_the_same_files(src, single, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "modelopt_streaming",
            "quantize",
            "--input_dir",
            src,
            "--output_dir",
            tmp_path / "out",
            "--max_shard_size",
            "30KB",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree(tmp_path / "out") == single
    assert r.stdout.count("wrote ") == 1  # rank 0 alone reports


def test_torchrun_resume_after_one_run(src, single, tmp_path):
    """A torchrun job resumes a directory a single process left half-done, with the same result."""
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelopt_streaming",
            "quantize",
            "--input_dir",
            src,
            "--output_dir",
            out,
            "--max_shard_size",
            "30KB",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0
    for p in sorted(out.glob("model-*.safetensors"))[::2]:
        p.unlink()
    (out / "hf_quant_config.json").unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29518",
            "-m",
            "modelopt_streaming",
            "quantize",
            "--input_dir",
            src,
            "--output_dir",
            out,
            "--max_shard_size",
            "30KB",
            "--resume",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree(out) == single


def test_torchrun_splits_units_inside_one_shard(src, tmp_path):
    """One output shard and two ranks: each rank writes every other unit at its planned offset."""
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run(
        [sys.executable, "-m", "modelopt_streaming", "quantize", "--input_dir", src, "--output_dir", one, "--quiet"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert len(list(one.glob("model-*.safetensors"))) == 1
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29519",
            "-m",
            "modelopt_streaming",
            "quantize",
            "--input_dir",
            src,
            "--output_dir",
            two,
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree(two) == tree(one)
