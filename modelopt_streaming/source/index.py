"""Index: what tensors a safetensors checkpoint holds, where, in which dtype and shape.

Built from the index JSON and the shards' headers alone: no tensor data is read, so indexing a
1 TB checkpoint costs a few MB of reads. Every header is checked here, once, so that later stages
can trust offsets and sizes.
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

# A header is JSON describing tensors; anything past this is not a checkpoint we should parse.
MAX_HEADER_BYTES = 100 * 1024 * 1024

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


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Parse one shard's header; returns (tensor entries, absolute offset of the data section)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"file of {size} bytes is too short to be a safetensors shard")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {header_len} is absurdly large")
            if 8 + header_len > size:
                raise _fail(path, f"header length {header_len} runs past the end of the file ({size} bytes)")
            raw = f.read(header_len)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_len = size - data_start
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _fail(path, "header entry lacks dtype, shape or data_offsets", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise _fail(path, f"unknown dtype {dtype!r}", name)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _fail(path, f"invalid shape {shape!r}", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _fail(path, f"invalid data_offsets {offsets!r}", name)
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _fail(
                path,
                f"data offsets [{begin}, {end}] out of range: the data section is {data_len} bytes "
                "(truncated or corrupt shard?)",
                name,
            )
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end - begin != expected:
            raise _fail(path, f"shape {shape} of {dtype} needs {expected} bytes but offsets span {end - begin}", name)
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(path, f"data of {n0!r} and {n1!r} overlap")
    return header, data_start


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
    """Index a Hugging Face safetensors checkpoint directory (sharded or single-file)."""
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
