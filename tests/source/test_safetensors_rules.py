"""read_header accepts exactly the files the safetensors library accepts.

The rules are safetensors' own (huggingface/safetensors, safetensors/src/tensor.rs: ``SafeTensors::read_metadata``,
the serde derives of ``HashMetadata`` and ``TensorInfo``, ``Metadata::validate``). For each, a crafted file breaks
it; the installed ``safetensors`` library is the oracle that it is refused, and ours must refuse it too: in
``read_header``, in ``validate`` (a one-line finding of the "shards" check naming the file and the rule) and in
``quantize`` (a non-zero exit and a one-line error naming the file). Files safetensors accepts, our writer's
space-padded headers among them, must be accepted.
"""

import json
import struct
from pathlib import Path

import pytest
import safetensors
import torch

from modelopt_streaming.cli import main
from modelopt_streaming.errors import CheckpointError
from modelopt_streaming.sink.writer import ShardWriter
from modelopt_streaming.source.index import TensorSpec, build_index, read_header


def u8(n: int, begin: int, end: int, dtype: str = "U8") -> dict:
    return {"dtype": dtype, "shape": [n], "data_offsets": [begin, end]}


def st_bytes(header: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: the 8-byte length (the header's own unless ``length``), the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


A4 = b'"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}'

# rule -> (file bytes, what our message says). Each breaks exactly one rule of tensor.rs.
REFUSED = {
    # read_metadata: fewer than 8 bytes (HeaderTooSmall)
    "shorter_than_length_prefix": (b"\x02\x00\x00", "too short to be a safetensors shard"),
    # read_metadata: n > MAX_HEADER_SIZE = 100_000_000 (HeaderTooLarge); 100 MiB used to pass here
    "header_over_100_000_000_bytes": (st_bytes(b"{}", length=100_000_001), "over safetensors' limit of 100000000"),
    # read_metadata: 8 + n beyond the buffer (InvalidHeaderLength)
    "header_past_end_of_file": (st_bytes(b"{}", length=4096), "runs past the end of the file"),
    # read_metadata: from_utf8 (InvalidHeader)
    "header_not_utf8": (st_bytes(b'{"\xff":1}'), "not valid UTF-8"),
    # read_metadata: serde_json::from_str (InvalidHeaderDeserialization), JSON syntax
    "header_not_json": (st_bytes(b'{"a":'), "not valid JSON"),
    "nan_is_not_json": (st_bytes(b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"z":NaN}}', b"1234"), "NaN"),
    "nul_padding_after_json": (st_bytes(b"{" + A4 + b"}\x00\x00\x00", b"1234"), "not valid JSON"),
    "bom_before_json": (st_bytes(b"\xef\xbb\xbf{" + A4 + b"}", b"1234"), "not valid JSON"),
    "lone_surrogate_escape": (
        st_bytes(b'{"\\ud800":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', b"1234"),
        "surrogate",
    ),
    "nesting_past_serde_recursion_limit": (
        st_bytes(
            b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"z":' + b"[" * 126 + b"]" * 126 + b"}}", b"1234"
        ),
        "levels deep",
    ),
    "nesting_past_limit_with_escapes": (  # an escape takes read_header's slower parse, which walks everything
        st_bytes(
            b'{"\\u0061":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"z":' + b"[" * 126 + b"]" * 126 + b"}}", b"1234"
        ),
        "levels deep",
    ),
    # HashMetadata: a map at the top, ``__metadata__`` once, and a map of strings to strings
    "header_not_object": (st_bytes(b"[]"), "not a JSON object"),
    "metadata_twice": (st_bytes(b'{"__metadata__":{"a":"b"},"__metadata__":{"c":"d"}}'), "two __metadata__"),
    "metadata_value_not_string": (st_bytes({"__metadata__": {"format": 1}}), "__metadata__ must be"),
    "metadata_not_object": (st_bytes({"__metadata__": ["pt"]}), "__metadata__ must be"),
    # TensorInfo: dtype, shape and data_offsets present, once, of their types
    "entry_not_object": (st_bytes({"a": "surprise"}), "lacks dtype, shape or data_offsets"),
    "entry_lacks_offsets": (st_bytes({"a": {"dtype": "U8", "shape": [0]}}), "lacks dtype, shape or data_offsets"),
    "entry_repeats_field": (
        st_bytes(b'{"a":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}}', b"1234"),
        "repeats dtype",
    ),
    "dtype_unknown": (st_bytes({"a": u8(4, 0, 4, dtype="u8")}, b"1234"), "unknown dtype 'u8'"),
    "shape_negative": (
        st_bytes({"a": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 4]}}, b"1234"),
        "invalid shape",
    ),
    "shape_bool": (st_bytes({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"1"), "invalid shape"),
    "shape_float": (st_bytes(b'{"a":{"dtype":"U8","shape":[4.0],"data_offsets":[0,4]}}', b"1234"), "invalid shape"),
    "shape_minus_zero": (st_bytes(b'{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'), "invalid shape"),
    "offsets_not_a_pair": (
        st_bytes({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 4]}}, b"1234"),
        "invalid data_offsets",
    ),
    # Metadata::validate: in offset order each tensor starts where the last ended, from 0 (InvalidOffset)
    "gap_before_first_tensor": (st_bytes({"a": u8(4, 1, 5)}, b"12345"), "a gap after byte 0"),
    "gap_between_tensors": (st_bytes({"a": u8(4, 0, 4), "b": u8(4, 8, 12)}, b"x" * 12), "a gap after byte 4"),
    "overlapping_tensors": (st_bytes({"a": u8(4, 0, 4), "b": u8(4, 2, 6)}, b"x" * 6), "an overlap"),
    "same_offsets_twice": (st_bytes({"a": u8(4, 0, 4), "b": u8(4, 0, 4)}, b"x" * 4), "an overlap"),
    "offsets_end_before_begin": (st_bytes({"a": u8(4, 0, 4), "b": u8(0, 4, 0)}, b"x" * 4), "end before they begin"),
    # Metadata::validate: the byte size is shape x dtype (TensorInfoInvalid, MisalignedSlice, ValidationOverflow)
    "size_not_shape_times_dtype": (st_bytes({"a": u8(4, 0, 5)}, b"12345"), "needs 4 bytes but data_offsets span 5"),
    "sub_byte_dtype_off_boundary": (st_bytes({"a": u8(3, 0, 2, dtype="F4")}, b"12"), "byte boundary"),
    "shape_overflows_usize": (
        st_bytes({"a": {"dtype": "U8", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}}),
        "overflows a 64-bit byte count",
    ),
    # read_metadata: the last tensor ends at the end of the file (MetadataIncompleteBuffer)
    "data_shorter_than_offsets": (st_bytes({"a": u8(8, 0, 8)}, b"1234"), "truncated shard?"),
    "bytes_after_last_tensor": (st_bytes({"a": u8(4, 0, 4)}, b"123456"), "2 bytes after the last tensor's data"),
}

# Files safetensors accepts: read_header must accept them too.
ACCEPTED = {
    "trailing_spaces": st_bytes(b"{" + A4 + b"}    ", b"1234"),
    "leading_whitespace": st_bytes(b" \n\t{" + A4 + b"}", b"1234"),
    "metadata_null": st_bytes(b'{"__metadata__":null,' + A4 + b"}", b"1234"),
    "unknown_entry_field": st_bytes(b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"z":{"y":[1,2]}}}', b"1234"),
    "entry_as_array": st_bytes(b'{"a":["U8",[4],[0,4]]}', b"1234"),
    "zero_size_tensors": st_bytes({"e": u8(0, 0, 0), "f": u8(0, 0, 0), "a": u8(4, 0, 4), "z": u8(0, 4, 4)}, b"1234"),
    "empty": st_bytes(b"{}"),
    "escaped_names_and_field_names_as_values": st_bytes(
        b'{"__metadata__":{"dtype":"shape"},"\\u00e9":{"\\u0064type":"U8","shape":[4],"data_offsets":[0,4]}}', b"1234"
    ),
    "offsets_not_in_name_order": st_bytes({"b": u8(2, 2, 4), "a": u8(2, 0, 2)}, b"1234"),
    "nesting_at_serde_recursion_limit": st_bytes(
        b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"z":' + b"[" * 125 + b"]" * 125 + b"}}", b"1234"
    ),
}


def write(tmp_path: Path, blob: bytes) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors").write_bytes(blob)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    return d / "model.safetensors"


def safetensors_accepts(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            list(f.keys())
    except Exception:  # noqa: BLE001 - the library raises SafetensorError, and OSError for a short file
        return False
    return True


@pytest.mark.parametrize("rule", sorted(REFUSED))
def test_safetensors_refuses(rule, tmp_path):
    assert not safetensors_accepts(write(tmp_path, REFUSED[rule][0]))


@pytest.mark.parametrize("rule", sorted(REFUSED))
def test_read_header_refuses(rule, tmp_path):
    path = write(tmp_path, REFUSED[rule][0])
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    message = str(e.value)
    assert message.startswith(f"{path}") and REFUSED[rule][1] in message and "\n" not in message


@pytest.mark.parametrize("rule", sorted(REFUSED))
def test_validate_reports_the_rule(rule, tmp_path, capsys):
    path = write(tmp_path, REFUSED[rule][0])
    (path.parent / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    assert main(["validate", str(path.parent), "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)["findings"]
    (shards,) = [f for f in findings if f["check"] == "shards"]
    assert shards["level"] == "error" and str(path) in shards["message"] and REFUSED[rule][1] in shards["message"]
    assert main(["validate", str(path.parent)]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("❌ [shards]")]
    assert lines == [f"❌ [shards] {shards['message']}"]


@pytest.mark.parametrize("rule", sorted(REFUSED))
def test_quantize_refuses(rule, tmp_path, capsys):
    path = write(tmp_path, REFUSED[rule][0])
    code = main(["quantize", "--input_dir", str(path.parent), "--output_dir", str(tmp_path / "out"), "--quiet"])
    assert code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and REFUSED[rule][1] in errors[0], errors


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_what_safetensors_accepts_is_read(case, tmp_path):
    path = write(tmp_path, ACCEPTED[case])
    assert safetensors_accepts(path)
    entries, data_start = read_header(path)
    with safetensors.safe_open(str(path), "pt") as f:
        assert sorted(entries) == sorted(f.keys())
        for name, e in entries.items():
            assert list(f.get_slice(name).get_shape()) == e["shape"]
    assert data_start == 8 + struct.unpack("<Q", ACCEPTED[case][:8])[0]


def test_a_valid_dtype_this_tool_does_not_read_is_refused_as_such(tmp_path):
    """F8_E8M0 is a safetensors dtype; refusing it is our limit, and the message says so, not a format rule."""
    path = write(tmp_path, st_bytes({"a": u8(4, 0, 4, dtype="F8_E8M0")}, b"1234"))
    assert safetensors_accepts(path)
    with pytest.raises(CheckpointError, match="F8_E8M0 is not supported by this tool"):
        read_header(path)


@pytest.mark.parametrize("lengths", [[1], [3, 5], [7, 1, 2], [8, 16], [0, 0, 3]])
def test_our_writer_output_passes_both(tmp_path, lengths):
    """The writer pads its header with spaces to 8-byte alignment, which safetensors allows."""
    tensors = {f"t{i}": torch.arange(n, dtype=torch.uint8) for i, n in enumerate(lengths)}
    tensors["name_" + "x" * len(lengths)] = torch.ones(2, 3, dtype=torch.bfloat16)
    specs = [TensorSpec(n, "U8" if t.dtype == torch.uint8 else "BF16", tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, "model.safetensors", specs)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    path = tmp_path / "model.safetensors"
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    assert safetensors_accepts(path)
    read_header(path)
    assert sorted(build_index(tmp_path).tensors) == sorted(tensors)
