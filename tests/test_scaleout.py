"""Same bytes whatever runs the job: fused or reference codec, one process or torchrun's two."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import make_model_checkpoint


def quantize_cli(src: Path, out: Path, *extra: str, torchrun_port: int | None = None, env=None):
    """One run as a user types it: the console module, or under torchrun with two processes."""
    args = ["-m", "modelopt_streaming", "quantize", "--input_dir", str(src), "--output_dir", str(out), *extra]
    if torchrun_port:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(torchrun_port), *args]
        env = {
            k: v for k, v in (env or os.environ).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
        }
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


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
    quantize_cli(src, out, "--max_shard_size", "30KB", "--quiet")
    files = tree(out)
    assert sum(f.startswith("model-") for f in files) >= 6
    return files


def test_reference_codec_gives_the_same_files(src, single, tmp_path):
    env = {**os.environ, "MODELOPT_STREAMING_CODEC": "reference"}
    r = quantize_cli(src, tmp_path / "out", "--max_shard_size", "30KB", env=env)
    assert "codec: torch reference codec on cpu" in r.stderr
    assert tree(tmp_path / "out") == single


def test_torchrun_two_processes_gives_the_same_files(src, single, tmp_path):
    r = quantize_cli(src, tmp_path / "out", "--max_shard_size", "30KB", "--device", "cpu", torchrun_port=29517)
    assert tree(tmp_path / "out") == single
    assert r.stdout.count("wrote ") == 1  # rank 0 alone reports


def test_torchrun_resume_after_one_run(src, single, tmp_path):
    """A torchrun job resumes a directory a single process left half-done, with the same result."""
    out = tmp_path / "out"
    quantize_cli(src, out, "--max_shard_size", "30KB", "--quiet")
    for p in sorted(out.glob("model-*.safetensors"))[::2]:
        p.unlink()
    (out / "hf_quant_config.json").unlink()
    quantize_cli(src, out, "--max_shard_size", "30KB", "--resume", torchrun_port=29518)
    assert tree(out) == single


def test_torchrun_splits_units_inside_one_shard(src, tmp_path):
    """One output shard and two ranks: each rank writes its share of the units at their planned offsets."""
    one, two = tmp_path / "one", tmp_path / "two"
    quantize_cli(src, one, "--quiet")
    assert len(list(one.glob("model-*.safetensors"))) == 1
    quantize_cli(src, two, "--device", "cpu", torchrun_port=29519)
    assert tree(two) == tree(one)
