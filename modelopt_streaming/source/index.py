"""Index: what tensors a safetensors checkpoint holds, where, in which dtype and shape.

Built from the index JSON and the shards' headers alone: no tensor data is read, so indexing a
1 TB checkpoint costs a few MB of reads. Every header is checked here, once, against the safetensors
library's own rules, so that later stages can trust offsets and sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelopt_streaming.errors import CheckpointError
from modelopt_streaming.source.header_json import ENTRY_FIELDS, parse_header_json

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "FLOAT_DTYPES",
    "INDEX_FILE",
    "MAX_HEADER_BYTES",
    "SINGLE_FILE",
    "CheckpointIndex",
    "TensorInfo",
    "TensorSpec",
    "build_index",
    "header_digest",
    "load_json",
    "read_header",
    "shard_tensors",
    "source_fingerprint",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# What a safetensors file must be, as the safetensors library itself decides: huggingface/safetensors,
# safetensors/src/tensor.rs (commit 24b0b28, the 0.8 line): ``SafeTensors::read_metadata`` (length prefix,
# header size, UTF-8, JSON parsed into ``HashMetadata``, data covering the rest of the file exactly), the serde
# derives of ``HashMetadata`` and ``TensorInfo`` (what the JSON may hold) and ``Metadata::validate`` (offsets
# contiguous from 0 in sorted order, each size = shape x dtype); serde_json's grammar is in header_json.py.
# ``read_header`` refuses what ``safetensors.safe_open`` refuses, naming the rule; tests/test_safetensors_rules.py
# crafts one file per rule.
MAX_HEADER_BYTES = 100_000_000  # tensor.rs MAX_HEADER_SIZE
_USIZE_MAX = 2**64 - 1  # lengths, shapes and offsets are usize in tensor.rs
# tensor.rs ``Dtype`` and ``Dtype::bitsize``: every dtype of the format, bits per element. Those missing from
# DTYPES make valid files that this tool cannot read.
_FORMAT_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip

# safetensors dtype names -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a safetensors header describes it before any offset is known: what the plan lays out
    and the writer writes."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of a checkpoint on disk: its header entry and its absolute byte range in its shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # relative to the checkpoint directory
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class CheckpointIndex:
    """What ``build_index`` found: the tensors by name, the shard files (relative to ``root``) and config.json."""

    root: Path
    tensors: dict[str, TensorInfo]
    files: list[str]
    file_sizes: dict[str, int]
    config: dict = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]


def _fail(path: Path, message: str, tensor: str | None = None) -> CheckpointError:
    where = f"{path}" + (f", tensor {tensor!r}" if tensor else "")
    return CheckpointError(f"{where}: {message}")


def _is_usize(v: object) -> bool:
    return type(v) is int and 0 <= v <= _USIZE_MAX  # not bool, not float: serde's usize takes neither


def _entries(path: Path, header: object) -> dict[str, dict]:
    """The tensor entries of a parsed header, each as {dtype, shape, data_offsets}, checked as serde
    deserializes ``HashMetadata`` (tensor.rs): a JSON object; ``__metadata__`` absent, null or a map of strings
    to strings; every other key a TensorInfo of a known dtype, a shape of usize and a pair of usize offsets."""
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _fail(path, "__metadata__ must be a JSON object of strings to strings")
    entries = {}
    for name, entry in header.items():
        if isinstance(entry, list) and len(entry) == len(ENTRY_FIELDS):
            entry = dict(zip(ENTRY_FIELDS, entry))  # serde also reads a struct from the array of its fields
        if not isinstance(entry, dict) or not set(ENTRY_FIELDS) <= entry.keys():
            raise _fail(path, "header entry lacks dtype, shape or data_offsets", name)
        dtype, shape, offsets = (entry[k] for k in ENTRY_FIELDS)
        if not isinstance(dtype, str) or dtype not in _FORMAT_DTYPE_BITS:
            raise _fail(path, f"unknown dtype {dtype!r}", name)
        if not (isinstance(shape, list) and all(_is_usize(d) for d in shape)):
            raise _fail(path, f"invalid shape {shape!r}: expected a list of non-negative integers", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_usize(o) for o in offsets)):
            raise _fail(path, f"invalid data_offsets {offsets!r}: expected two non-negative integers", name)
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    return entries


def _check_layout(path: Path, entries: dict[str, dict], data_len: int) -> None:
    """tensor.rs ``Metadata::validate``, then read_metadata's last check: in offset order, each tensor's data
    starts where the previous one ends (the first at 0), spans exactly shape x dtype bytes, and the last one
    ends at the end of the file."""
    start = 0
    for (begin, end), name in sorted((tuple(e["data_offsets"]), n) for n, e in entries.items()):
        if end < begin:
            raise _fail(path, f"data_offsets [{begin}, {end}] end before they begin", name)
        if begin != start:
            where = f"a gap after byte {start}" if begin > start else f"an overlap with the data before byte {start}"
            raise _fail(
                path,
                f"data starts at byte {begin} of the data section, {where}: tensors must lie back to back from "
                "offset 0",
                name,
            )
        start = end
        dtype, shape = entries[name]["dtype"], entries[name]["shape"]
        numel = 1
        for d in shape:  # tensor.rs folds with checked_mul: an overflow is refused even before a 0 dimension
            numel *= d
            if numel > _USIZE_MAX:
                break
        bits = numel * _FORMAT_DTYPE_BITS[dtype]
        if bits > _USIZE_MAX:
            raise _fail(path, f"shape {shape} of {dtype} overflows a 64-bit byte count", name)
        if bits % 8:
            raise _fail(path, f"shape {shape} of {dtype} does not end on a byte boundary", name)
        if end - begin != bits // 8:
            raise _fail(
                path, f"shape {shape} of {dtype} needs {bits // 8} bytes but data_offsets span {end - begin}", name
            )
    if start != data_len:
        if start > data_len:
            raise _fail(
                path,
                f"the tensors' data ends at byte {start} of the data section, but the file holds {data_len} "
                "bytes after the header (truncated shard?)",
            )
        raise _fail(path, f"{data_len - start} bytes after the last tensor's data: the data must fill the file exactly")
    for name, entry in entries.items():
        if entry["dtype"] not in DTYPES:
            raise _fail(path, f"dtype {entry['dtype']} is not supported by this tool", name)


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Parse and check one safetensors file's header, by the safetensors library's own rules.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``(entries, data_start)``: each tensor's header entry ({dtype, shape, data_offsets}, offsets relative to
        the data section) by name, without ``__metadata__``; and the absolute offset of the data section.

    Raises:
        CheckpointError: the file cannot be read, or safetensors would refuse it (or it holds a dtype this tool
            does not read); one line naming the file, the tensor where there is one, and the rule.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"file of {size} bytes is too short to be a safetensors shard")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {header_len} is over safetensors' limit of {MAX_HEADER_BYTES} bytes")
            if 8 + header_len > size:
                raise _fail(path, f"header length {header_len} runs past the end of the file ({size} bytes)")
            raw = f.read(header_len)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"header is not valid UTF-8 ({e})") from None
    try:
        header = parse_header_json(text)
    except ValueError as e:
        raise _fail(path, *e.args) from None
    entries = _entries(path, header)
    data_start = 8 + header_len
    _check_layout(path, entries, size - data_start)
    return entries, data_start


def shard_tensors(root: Path, rel: str) -> dict[str, TensorInfo]:
    """The tensors of one shard, from its checked header, with absolute byte ranges.

    Args:
        root: the checkpoint directory.
        rel: the shard's file name, relative to ``root``.

    Returns:
        TensorInfo by tensor name, in header order.

    Raises:
        CheckpointError: as ``read_header``.
    """
    header, data_start = read_header(root / rel)
    return {
        name: TensorInfo(
            name,
            e["dtype"],
            tuple(e["shape"]),
            rel,
            data_start + e["data_offsets"][0],
            data_start + e["data_offsets"][1],
        )
        for name, e in header.items()
    }


def _safe_relative(name: str, source: Path) -> str:
    """A shard name from an index must name a file of the checkpoint directory itself.

    The *name* is judged, not where it resolves: a Hugging Face cache snapshot holds symlinks into
    ``../../blobs/``, and those are followed for reading like any file of the directory.
    """
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise _fail(source, f"weight_map names an invalid shard path {name!r}")
    if ".." in Path(name).parts:
        raise _fail(source, f"weight_map names a shard outside the checkpoint: {name!r}")
    if "/" in name:
        raise _fail(source, f"weight_map names a shard in another directory: {name!r} (shards sit beside the index)")
    return name


def load_json(path: Path) -> dict:
    """A JSON file holding an object (config.json, an index).

    Raises:
        CheckpointError: the file cannot be read, is not valid JSON, or holds something else than an object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def build_index(root: str | os.PathLike) -> CheckpointIndex:
    """Index a Hugging Face safetensors checkpoint directory (sharded or single-file) from its headers alone.

    Args:
        root: the directory: ``model.safetensors.index.json`` with its shards, ``model.safetensors``, or one
            ``*.safetensors`` file.

    Returns:
        Every tensor's TensorInfo, the shard files and their sizes, and config.json (empty when absent).

    Raises:
        CheckpointError: no safetensors checkpoint (pickles are refused, never opened), a shard safetensors
            would refuse (``read_header``), a tensor in two shards, or an index that disagrees with the shards.
    """
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    index_path = root / INDEX_FILE
    expected: dict[str, str] | None = None
    if index_path.exists():
        weight_map = load_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: has no weight_map")
        expected = {}
        for tensor, shard in weight_map.items():
            expected[tensor] = _safe_relative(shard, index_path)
        files = sorted(set(expected.values()))
    elif (root / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        shards = sorted(p.name for p in root.glob("*.safetensors"))
        if len(shards) == 1:
            files = shards
        elif shards:
            raise CheckpointError(f"{root}: {len(shards)} safetensors shards but no {INDEX_FILE}")
        else:
            pickles = sorted(p.name for p in root.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
            if pickles:
                raise CheckpointError(
                    f"{root}: only pickle checkpoints ({', '.join(pickles[:3])}); they can run code when "
                    "loaded and are never opened. Convert to safetensors with a trusted tool first."
                )
            raise CheckpointError(f"{root}: no safetensors checkpoint ({INDEX_FILE} or {SINGLE_FILE})")

    tensors: dict[str, TensorInfo] = {}
    file_sizes: dict[str, int] = {}
    for rel in files:
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: shard is missing")
        shard = shard_tensors(root, rel)
        file_sizes[rel] = path.stat().st_size
        for name, info in shard.items():
            if name in tensors:
                raise _fail(path, f"tensor also stored in {tensors[name].file}", name)
            tensors[name] = info
    if expected is not None:
        for name, rel in expected.items():
            if name not in tensors or tensors[name].file != rel:
                raise _fail(root / rel, "the index names this tensor but the shard lacks it", name)
        extra = sorted(set(tensors) - set(expected))
        if extra:
            info = tensors[extra[0]]
            raise _fail(root / info.file, "tensor is in the shard but not in the index", extra[0])
    config = load_json(root / "config.json") if (root / "config.json").exists() else {}
    return CheckpointIndex(root=root, tensors=tensors, files=files, file_sizes=file_sizes, config=config)


def source_fingerprint(index: CheckpointIndex) -> dict:
    """What identifies the source for a resume: each file's size and the sha256 of its header."""
    return {f: {"size": index.file_sizes[f], "header_sha256": header_digest(index.root / f)} for f in index.files}


def header_digest(path: Path) -> str:
    """sha256 of a shard's length prefix and header: identifies its layout without reading tensor data."""
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        return hashlib.sha256(head + f.read(min(n, MAX_HEADER_BYTES))).hexdigest()
