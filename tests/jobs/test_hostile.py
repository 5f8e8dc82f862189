"""Broken or hostile checkpoints: a one-line error naming the file (and tensor), a non-zero exit, no
traceback, the input untouched, and nothing in the output that looks finished."""

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

A = "model.layers.0.mlp.gate_proj.weight"
B = "model.layers.0.mlp.up_proj.weight"
C = "model.layers.0.mlp.down_proj.weight"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file from a hand-written header: how a hostile file is made."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def good_checkpoint(d: Path) -> Path:
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    t = {n: torch.randn(64, 64, generator=g).to(torch.bfloat16) for n in (A, B, C)}
    save_file({A: t[A], C: t[C]}, str(d / SHARD1))
    save_file({B: t[B]}, str(d / SHARD2))
    wm = {A: SHARD1, C: SHARD1, B: SHARD2}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    return d


def set_index(d: Path, **changes) -> None:
    p = d / "model.safetensors.index.json"
    data = json.loads(p.read_text())
    data["weight_map"].update(changes)
    p.write_text(json.dumps(data))


def patch_header(path: Path, edit) -> None:
    """Rewrite a shard's header through ``edit(header)``, keeping its data bytes."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    raw_safetensors(path, header, blob[8 + n :])


class Payload:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _missing_shard(d):
    (d / SHARD2).unlink()
    return SHARD2


def _index_not_json(d):
    (d / "model.safetensors.index.json").write_text("{not json")
    return "model.safetensors.index.json"


def _config_not_json(d):
    (d / "config.json").write_text("[1, 2,")
    return "config.json"


def _weight_map_escapes(d):
    set_index(d, **{B: "../outside.safetensors"})
    return "../outside.safetensors"


def _weight_map_absolute(d):
    set_index(d, **{B: "/etc/passwd"})
    return "/etc/passwd"


def _index_names_missing_tensor(d):
    set_index(d, **{"model.layers.0.self_attn.q_proj.weight": SHARD1})
    return "model.layers.0.self_attn.q_proj.weight"


def _tensor_in_two_shards(d):
    save_file(
        {B: torch.zeros(64, 64, dtype=torch.bfloat16), C: torch.zeros(64, 64, dtype=torch.bfloat16)}, str(d / SHARD2)
    )
    return C


def _tensor_not_in_index(d):
    save_file({B: torch.zeros(64, 64, dtype=torch.bfloat16), "extra.weight": torch.zeros(4)}, str(d / SHARD2))
    return "extra.weight"


def _truncated_shard(d):
    p = d / SHARD1
    p.write_bytes(p.read_bytes()[:-3000])
    return SHARD1


def _header_beyond_file(d):
    p = d / SHARD2
    blob = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(blob) * 4) + blob[8:])
    return SHARD2


def _header_absurd(d):
    p = d / SHARD2
    p.write_bytes(struct.pack("<Q", 2**60) + p.read_bytes()[8:])
    return SHARD2


def _header_not_json(d):
    p = d / SHARD2
    blob = bytearray(p.read_bytes())
    blob[8:20] = b"\xff\xfe garbage "
    p.write_bytes(bytes(blob))
    return SHARD2


def _offsets_out_of_range(d):
    patch_header(d / SHARD2, lambda h: h[B].update(data_offsets=[0, 10**9]))
    return B


def _offsets_overlap(d):
    def edit(h):
        h[C]["data_offsets"] = list(h[A]["data_offsets"])

    patch_header(d / SHARD1, edit)
    # Both tensors now start past offset 0, so safetensors' contiguity rule (a gap before the first) fires first.
    return "back to back from offset 0"


def _unknown_dtype(d):
    patch_header(d / SHARD2, lambda h: h[B].update(dtype="Q7"))
    return B


def _shape_mismatch(d):
    patch_header(d / SHARD2, lambda h: h[B].update(shape=[64, 65]))
    return B


def _nan_weight(d):
    w = torch.randn(64, 64).to(torch.bfloat16)
    w[3, 5] = float("nan")
    w[7, 1] = float("nan")
    save_file({B: w}, str(d / SHARD2))
    return f"{B}'"  # the message names the tensor (quoted) and the count


def _inf_weight(d):
    w = torch.randn(64, 64).to(torch.bfloat16)
    w[0, 0] = float("inf")
    save_file({B: w}, str(d / SHARD2))
    return B


def _empty_dir(d):
    for p in d.iterdir():
        p.unlink()
    return str(d)


def _pickle_only(d):
    for p in d.iterdir():
        p.unlink()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(d.parent / "PWNED"), f)
    return "pytorch_model.bin"


def _shards_without_index(d):
    (d / "model.safetensors.index.json").unlink()
    return "model.safetensors.index.json"


def _weight_map_not_object(d):
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    return "weight_map"


def _header_entry_not_object(d):
    patch_header(d / SHARD2, lambda h: h.update({B: "surprise"}))
    return B


CASES = {
    f.__name__[1:]: f
    for f in (
        _missing_shard,
        _index_not_json,
        _config_not_json,
        _weight_map_escapes,
        _weight_map_absolute,
        _index_names_missing_tensor,
        _tensor_in_two_shards,
        _tensor_not_in_index,
        _truncated_shard,
        _header_beyond_file,
        _header_absurd,
        _header_not_json,
        _offsets_out_of_range,
        _offsets_overlap,
        _unknown_dtype,
        _shape_mismatch,
        _nan_weight,
        _inf_weight,
        _empty_dir,
        _pickle_only,
        _shards_without_index,
        _weight_map_not_object,
        _header_entry_not_object,
    )
}


def quantize_cli(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "modelopt_streaming",
            "quantize",
            "--input_dir",
            str(src),
            "--output_dir",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
    )


def hashes(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input(case, tmp_path):
    src = good_checkpoint(tmp_path / "src")
    expect = CASES[case](src)
    before = hashes(src)
    out = tmp_path / "out"
    r = quantize_cli(src, out)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert expect in errors[0], errors[0]
    assert hashes(src) == before
    assert not (out / "hf_quant_config.json").exists()
    assert not (tmp_path / "PWNED").exists()
    if case in ("nan_weight", "inf_weight"):
        assert ("2 NaN/Inf" if case == "nan_weight" else "1 NaN/Inf") in errors[0]


def test_nonfinite_allowed_on_request(tmp_path):
    src = good_checkpoint(tmp_path / "src")
    _nan_weight(src)
    r = quantize_cli(src, tmp_path / "out", "--allow_nonfinite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "hf_quant_config.json").exists()


def test_debug_shows_traceback(tmp_path):
    src = good_checkpoint(tmp_path / "src")
    _missing_shard(src)
    r = quantize_cli(src, tmp_path / "out", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr
