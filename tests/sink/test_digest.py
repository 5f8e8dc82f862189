"""Shard digests are derived from the digests of the tensors as they are written (no output byte is read back to
hash a shard), and are the same whoever wrote the tensors. Checked against an independent computation from the
file: the safetensors library's view of the tensors and hashlib."""

import hashlib
import json
import struct
import subprocess
import sys

import torch
from checkpoints import make_model_checkpoint
from safetensors import safe_open

from modelopt_streaming.sink.writer import PositionalShardWriter, ShardWriter, file_digest
from modelopt_streaming.source.index import TensorSpec


def independent_digest(path) -> str:
    """sha256 over sha256(length prefix + header) and sha256(each tensor's bytes), tensors in file order."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    parts = [hashlib.sha256(raw[: 8 + n]).digest()]
    with safe_open(str(path), "pt") as f:
        for name in order:
            t = f.get_tensor(name)
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            parts.append(hashlib.sha256(data).digest())
    return hashlib.sha256(b"".join(parts)).hexdigest()


def tensors():
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "a.weight_scale_2": torch.tensor(0.5),
        "b.empty": torch.zeros(0, 4, dtype=torch.uint8),
        "c.weight": torch.randint(0, 255, (33, 16), generator=g, dtype=torch.uint8),
    }


def specs(ts):
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8"}
    return [TensorSpec(k, names[v.dtype], tuple(v.shape)) for k, v in ts.items()]


def test_streamed_and_positional_shards_have_the_file_digest(tmp_path):
    ts = tensors()
    (tmp_path / "s").mkdir()
    w = ShardWriter(tmp_path / "s", "x.safetensors", specs(ts))
    for k, v in ts.items():
        w.write(k, v)
    streamed = w.close()

    (tmp_path / "p").mkdir()
    PositionalShardWriter.create(tmp_path / "p", "x.safetensors", specs(ts))
    # Two "ranks", each writing some tensors in its own order.
    first = PositionalShardWriter(tmp_path / "p", "x.safetensors", specs(ts))
    second = PositionalShardWriter(tmp_path / "p", "x.safetensors", specs(ts))
    for k in ("c.weight", "a.weight_scale_2"):
        first.write(k, ts[k])
    for k in ("b.empty", "a.weight"):
        second.write(k, ts[k])
    first.close()
    second.close()
    positional = first.finish({**first.digests(), **second.digests()})

    for directory, record in ((tmp_path / "s", streamed), (tmp_path / "p", positional)):
        path = directory / "x.safetensors"
        assert record["digest"] == independent_digest(path) == file_digest(path)
    assert (tmp_path / "s" / "x.safetensors").read_bytes() == (tmp_path / "p" / "x.safetensors").read_bytes()


def test_provenance_and_manifest_digests_match_the_files(tmp_path):
    src = make_model_checkpoint(tmp_path / "src", "qwen3_moe", n_shards=2)
    out = tmp_path / "out"
    args = ["--input_dir", str(src), "--output_dir", str(out), "--max_shard_size", "40KB", "--quiet"]
    r = subprocess.run([sys.executable, "-m", "modelopt_streaming", "quantize", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    provenance = json.loads((out / "modelopt_streaming.json").read_text())
    shards = provenance["shards"]
    assert len(shards) > 1 and sorted(s["file"] for s in shards) == sorted(p.name for p in out.glob("*.safetensors"))
    for s in shards:
        assert s["digest"] == independent_digest(out / s["file"])
    manifest = json.loads((out / "modelopt_streaming.manifest.json").read_text())
    assert {s["file"]: s["digest"] for s in manifest["shards"]} == {s["file"]: s["digest"] for s in shards}
