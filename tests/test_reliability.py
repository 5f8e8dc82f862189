"""Crash-safe exact resume, interrupts, refusals and disk-full handling, as a user meets them."""

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cmd(*args):
    return [sys.executable, "-m", "modelopt_streaming", *map(str, args)]


def run(*args, **kw):
    return subprocess.run(cmd(*args), capture_output=True, text=True, env=ENV, **kw)


def tree_hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """~130 MB of bf16 in 3 shards: long enough a run to be killed at many moments."""
    d = tmp_path_factory.mktemp("rel") / "src"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for s in range(3):
        part = {}
        for layer in range(s * 4, s * 4 + 4):
            p = f"model.layers.{layer}"
            for leaf, shape in (("gate_proj", (1024, 1024)), ("up_proj", (1024, 1024)), ("down_proj", (1024, 1024))):
                part[f"{p}.mlp.{leaf}.weight"] = torch.randn(shape, generator=g).to(torch.bfloat16)
            for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
                part[f"{p}.self_attn.{leaf}.weight"] = torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
            part[f"{p}.input_layernorm.weight"] = torch.ones(1024, dtype=torch.bfloat16)
        name = f"model-{s + 1:05d}-of-00003.safetensors"
        save_file(part, str(d / name))
        weight_map.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 12}))
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = run("quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", "3MB", "--quiet")
    assert r.returncode == 0, r.stderr
    return tree_hashes(out)


@pytest.fixture(scope="module")
def timings(src, tmp_path_factory):
    """(seconds to start and plan, seconds of actual work) of one uninterrupted run on this machine."""
    t = time.perf_counter()
    assert run("quantize", "--input_dir", src, "--dry_run").returncode == 0
    startup = time.perf_counter() - t
    t = time.perf_counter()
    out = tmp_path_factory.mktemp("timing") / "out"
    assert run("quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", "3MB").returncode == 0
    return startup, max(0.5, time.perf_counter() - t - startup)


def test_same_input_same_bytes(src, reference, tmp_path):
    run("quantize", "--input_dir", src, "--output_dir", tmp_path / "again", "--max_shard_size", "3MB", "--quiet")
    assert tree_hashes(tmp_path / "again") == reference


def test_sigkill_at_ten_random_moments_then_resume_is_byte_identical(src, reference, timings, tmp_path):
    out = tmp_path / "out"
    rng = random.Random(1234)
    args = ["quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", "3MB", "--quiet"]
    kills = 0
    for attempt in range(10):
        p = subprocess.Popen(
            cmd(*args, *(["--resume"] if attempt else [])),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Each attempt dies somewhere in its first eighth of the work (or while starting or resuming).
        startup, work = timings
        time.sleep(rng.uniform(0.5 * startup, startup + work / 8))
        if p.poll() is None:
            p.kill()
            kills += 1
        p.wait()
        if (out / "hf_quant_config.json").exists():  # looks finished: then it must be the finished output
            assert tree_hashes(out) == reference
    assert kills >= 8, "the run finished before most kills; the test proves too little"
    r = run(*args, "--resume", "--verify")
    assert r.returncode == 0, r.stderr
    assert tree_hashes(out) == reference


def test_sigterm_stops_quickly_and_prints_resume_command(src, reference, tmp_path):
    out = tmp_path / "out"
    args = ["quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", "3MB"]
    p = subprocess.Popen(cmd(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not list(out.glob("model-*.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    t = time.time()
    _, err = p.communicate(timeout=30)
    assert time.time() - t < 5
    assert p.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    assert not (out / "hf_quant_config.json").exists()
    assert not list(out.glob(".*.partial"))
    r = run(*args, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    assert tree_hashes(out) == reference


def test_disk_full_is_a_clean_error_then_resume_finishes(src, reference, tmp_path):
    out = tmp_path / "out"
    args = ["quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", "3MB", "--quiet"]

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, 2_500_000))  # smaller than one output shard

    r = subprocess.run(cmd(*args), capture_output=True, text=True, env=ENV, preexec_fn=limit_file_size)
    assert r.returncode == 1
    assert "failed" in r.stderr and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (out / "hf_quant_config.json").exists()
    r = run(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert tree_hashes(out) == reference


def test_resume_refuses_changed_options_and_source(src, tmp_path):
    out = tmp_path / "out"
    args = ["quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", "3MB", "--quiet"]
    assert run(*args).returncode == 0
    r = run(*args, "--resume", "--mlp_only")
    assert r.returncode == 2 and "options changed" in r.stderr and "scope" in r.stderr
    r = run("quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", "4MB", "--resume")
    assert r.returncode == 2 and "max_shard_size" in r.stderr


def test_resume_discards_corrupt_shard_with_verify(src, reference, tmp_path):
    out = tmp_path / "out"
    args = ["quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", "3MB", "--quiet"]
    assert run(*args).returncode == 0
    shard = sorted(out.glob("model-*.safetensors"))[2]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, different bytes: only the hash sees it
    shard.write_bytes(bytes(data))
    (out / ".model-00009-of-00099.safetensors.partial").write_bytes(b"junk")
    r = run(*args, "--resume", "--verify")
    assert r.returncode == 0, r.stderr
    assert tree_hashes(out) == reference


@pytest.mark.parametrize("case", ["inside_input", "not_empty", "unwritable", "not_our_dir_resume"])
def test_refusals_write_nothing(src, tmp_path, case):
    before = tree_hashes(src)
    out = tmp_path / "out"
    extra = []
    if case == "inside_input":
        out = src / "nvfp4"
    elif case == "not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "unwritable":
        out = Path("/proc/modelopt-streaming-test/out")
    elif case == "not_our_dir_resume":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        extra = ["--resume"]
    r = run("quantize", "--input_dir", src, "--output_dir", out, *extra)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert tree_hashes(src) == before
    if case in ("not_empty", "not_our_dir_resume"):
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    elif case == "inside_input":
        assert not out.exists()
