"""Checkpoints as people really have them: a Hugging Face cache snapshot (symlinks into ../../blobs) and a Hub id
already in that cache, read offline."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import make_model_checkpoint
from forkrun import tree_hashes as tree

SIDE_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}", "chat/template.jinja": "{{ x }}"}


def as_hub_cache(plain: Path, cache: Path, repo: str, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``plain`` out the way huggingface_hub caches a download: content-addressed blobs, a snapshot of
    relative symlinks, and refs/main naming the snapshot's commit."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    for f in sorted(p for p in plain.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.relative_to(plain)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelopt_streaming", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    src = make_model_checkpoint(tmp_path_factory.mktemp("hf") / "plain", "llama", n_shards=2)
    for rel, text in SIDE_FILES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    return src


def test_hub_cache_snapshot_and_hub_id_quantize_like_plain_files(plain, tmp_path):
    cache = tmp_path / "hub"
    snapshot = as_hub_cache(plain, cache, "acme/tiny-llama")
    assert all(p.is_symlink() for p in snapshot.rglob("*") if not p.is_dir())
    expected = tmp_path / "from-plain"
    r = run_cli("quantize", "--input_dir", str(plain), "--output_dir", str(expected), "--quiet")
    assert r.returncode == 0, r.stderr
    reference = tree(expected)
    for rel in SIDE_FILES:  # side files are part of the output, copied by content
        assert reference[rel] == hashlib.sha256(SIDE_FILES[rel].encode()).hexdigest()

    from_snapshot = tmp_path / "from-snapshot"
    r = run_cli("quantize", "--input_dir", str(snapshot), "--output_dir", str(from_snapshot), "--quiet")
    assert r.returncode == 0, r.stderr
    assert tree(from_snapshot) == reference
    assert not any(p.is_symlink() for p in from_snapshot.rglob("*"))

    env = {**os.environ, "HF_HUB_CACHE": str(cache)}
    from_id = tmp_path / "from-id"
    r = run_cli("quantize", "--input_dir", "acme/tiny-llama", "--output_dir", str(from_id), "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    assert tree(from_id) == reference
    # The input (blobs and links) is only read.
    assert tree(cache / "models--acme--tiny-llama" / "blobs") == {
        h: h for h in os.listdir(cache / "models--acme--tiny-llama" / "blobs")
    }


def test_hub_id_not_in_cache_is_refused_without_download(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    out = tmp_path / "out"
    r = run_cli("quantize", "--input_dir", "acme/not-here", "--output_dir", str(out), env=env)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "acme/not-here" in lines[0] and "never downloads" in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["sub/model-00001-of-00002.safetensors", "../x.safetensors", "/abs.safetensors"])
def test_index_names_are_judged_not_where_they_resolve(plain, tmp_path, name):
    src = tmp_path / "src"
    shutil.copytree(plain, src)
    index = src / "model.safetensors.index.json"
    text = index.read_text().replace('"model-00001-of-00002.safetensors"', f'"{name}"')
    index.write_text(text)
    r = run_cli("quantize", "--input_dir", str(src), "--output_dir", str(tmp_path / "out"))
    assert r.returncode != 0
    assert "model.safetensors.index.json" in r.stderr and name in r.stderr, r.stderr


def test_side_files_skip_the_files_that_describe_the_source(tmp_path):
    """One of our outputs as input (a decompressed checkpoint re-quantized): its provenance and manifest
    describe that directory, and a copy would sit in the new output as if it described it."""
    from modelopt_streaming.sink.export.side_files import side_files

    names = [
        "tokenizer.json",
        "modelopt_streaming.json",
        "modelopt_streaming.manifest.json",
        "hf_quant_config.json",
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00001.safetensors",
    ]
    for name in names:
        (tmp_path / name).write_text("{}")
    assert [str(p) for p in side_files(tmp_path)] == ["tokenizer.json"]
