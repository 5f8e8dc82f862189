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
class TensorInfo:
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


# DeepSeek-V3/R1 publish FP8 weights in 128 x 128 blocks, each with a float32 inverse scale.
FP8_BLOCK = 128


@dataclass(frozen=True)
class DecodedWeight:
    """A weight stored in a compressed source format and read back as bf16 (spec section 6).

    ``encoding`` "fp8_block": ``parts`` = (weight float8_e4m3fn [out, in], weight_scale_inv float32
    [ceil(out/128), ceil(in/128)]); the value is bf16(f32(weight) * scale_inv[i // 128, j // 128]), as
    DeepSeek's own FP8-to-BF16 conversion computes it.
    ``encoding`` "int4_pack": compressed-tensors ``pack-quantized`` (Kimi-K2 routed experts): ``parts`` =
    (weight_packed int32 [out, ceil(in/8)], weight_scale [out, in/group], weight_shape int64 [2]); element
    j of a row is bits 4*(j%8) of word j//8, stored as q+8; the value is bf16((q) * scale[:, j // group]).
    ``encoding`` "mxfp4": OCP MXFP4 as GPT-OSS publishes its 3-D experts: ``parts`` = (X_blocks uint8
    [E, out, in/32, 16], X_scales uint8 [E, out, in/32]); input j of a row is the low (j even) or high nibble
    of byte j//2 within its block of 32, an E2M1 code; the value is E2M1[code] * 2^(scale - 127), exact in
    bf16, and the weight reads back as X [E, in, out] (transformers' GPT-OSS layout, input dim in the middle).
    The parts may sit in different shards.
    """

    name: str
    encoding: str
    parts: tuple[TensorInfo, ...]
    shape: tuple[int, ...]
    dtype: str = "BF16"
    group_size: int = 0

    @property
    def file(self) -> str:
        return self.parts[0].file

    @property
    def begin(self) -> int:
        return self.parts[0].begin

    @property
    def nbytes(self) -> int:
        """Bytes read from the source (not the decoded size)."""
        return sum(p.nbytes for p in self.parts)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def decoded_weights(index: CheckpointIndex) -> dict[str, DecodedWeight]:
    """Source weights that need decoding, by tensor name; their scale tensors are consumed with them."""
    out = {}
    for name, info in index.tensors.items():
        if not name.endswith(".weight") or info.dtype not in ("F8_E4M3", "F8_E5M2"):
            continue
        scale = index.tensors.get(name + "_scale_inv")
        where = index.root / info.file
        if scale is None:
            raise CheckpointError(
                f"{where}, tensor {name!r}: FP8 weight without its weight_scale_inv; only "
                "DeepSeek-style 128x128 block FP8 sources are supported"
            )
        if len(info.shape) != 2 or info.dtype != "F8_E4M3":
            raise CheckpointError(
                f"{where}, tensor {name!r}: {info.dtype} {list(info.shape)} is not a 2-D "
                "float8_e4m3fn block-scaled weight"
            )
        blocks = tuple(-(-d // FP8_BLOCK) for d in info.shape)
        if scale.dtype != "F32" or scale.shape != blocks:
            raise CheckpointError(
                f"{index.root / scale.file}, tensor {scale.name!r}: {scale.dtype} "
                f"{list(scale.shape)}, expected F32 {list(blocks)} for 128x128 blocks"
            )
        out[name] = DecodedWeight(name, "fp8_block", (info, scale), info.shape)
    out.update(_int4_packed_weights(index))
    out.update(_mxfp4_weights(index))
    return out


def _int4_group_size(config: dict) -> int:
    for cfg in (config, config.get("text_config") or {}):
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        for group in ((qc or {}).get("config_groups") or {}).values():
            size = ((group or {}).get("weights") or {}).get("group_size")
            if isinstance(size, int) and size > 0:
                return size
    return 32


def _int4_packed_weights(index: CheckpointIndex) -> dict[str, DecodedWeight]:
    """Every pack-quantized INT4 weight, checked against its ``weight_shape`` values and the config's group
    size here, at plan time: a mismatch is a one-line error before any output, not hours into the run."""
    out = {}
    group = _int4_group_size(index.config)
    with _SmallTensorReader(index.root) as small:
        for name, packed in index.tensors.items():
            if not name.endswith(".weight_packed"):
                continue
            module = name[: -len(".weight_packed")]
            where = index.root / packed.file
            scale = index.tensors.get(f"{module}.weight_scale")
            shape = index.tensors.get(f"{module}.weight_shape")
            if f"{module}.weight_zero_point" in index.tensors:
                raise CheckpointError(f"{where}, tensor {name!r}: asymmetric INT4 (weight_zero_point) is not supported")
            if packed.dtype != "I32" or len(packed.shape) != 2 or scale is None or shape is None:
                raise CheckpointError(
                    f"{where}, tensor {name!r}: not a pack-quantized INT4 weight (int32 2-D with "
                    "weight_scale and weight_shape)"
                )
            if shape.dtype not in ("I64", "I32") or shape.numel != 2:
                raise CheckpointError(
                    f"{index.root / shape.file}, tensor {shape.name!r}: {shape.dtype} {list(shape.shape)}, "
                    "expected two integers (rows, columns)"
                )
            rows, cols = small.values(shape)
            if rows != packed.shape[0] or cols <= 0 or -(-cols // 8) != packed.shape[1]:
                raise CheckpointError(
                    f"{index.root / shape.file}, tensor {shape.name!r}: weight_shape [{rows}, {cols}] does not "
                    f"fit {name!r} {list(packed.shape)} (8 values per int32)"
                )
            if (
                scale.dtype not in FLOAT_DTYPES
                or len(scale.shape) != 2
                or scale.shape[0] != rows
                or scale.shape[1] != -(-cols // group)
            ):
                raise CheckpointError(
                    f"{index.root / scale.file}, tensor {scale.name!r}: {scale.dtype} {list(scale.shape)} does not "
                    f"fit weight_shape [{rows}, {cols}] with group size {group} (config.json quantization_config)"
                )
            out[f"{module}.weight"] = DecodedWeight(
                f"{module}.weight", "int4_pack", (packed, scale, shape), (rows, cols), group_size=group
            )
    return out


MXFP4_BLOCK = 32


def _mxfp4_weights(index: CheckpointIndex) -> dict[str, DecodedWeight]:
    """GPT-OSS's published MXFP4 experts (``X_blocks`` + ``X_scales``), read back as bf16 X [E, in, out]."""
    out = {}
    for name, blocks in index.tensors.items():
        if not name.endswith("_blocks"):
            continue
        base = name[: -len("_blocks")]
        scales = index.tensors.get(f"{base}_scales")
        where = index.root / blocks.file
        if scales is None:
            raise CheckpointError(f"{where}, tensor {name!r}: MXFP4 blocks without their {base}_scales tensor")
        if blocks.dtype != "U8" or len(blocks.shape) != 4 or blocks.shape[-1] != MXFP4_BLOCK // 2:
            raise CheckpointError(
                f"{where}, tensor {name!r}: {blocks.dtype} {list(blocks.shape)} is not MXFP4 3-D experts "
                "(uint8 [experts, out, in/32, 16], as GPT-OSS publishes them)"
            )
        if scales.dtype != "U8" or scales.shape != blocks.shape[:-1]:
            raise CheckpointError(
                f"{index.root / scales.file}, tensor {scales.name!r}: {scales.dtype} {list(scales.shape)}, "
                f"expected U8 {list(blocks.shape[:-1])} (one E8M0 scale per 32 values of {name!r})"
            )
        if base in index.tensors:
            raise CheckpointError(f"{where}, tensor {name!r}: {base!r} is stored both as MXFP4 and unquantized")
        n_exp, n_out, n_groups, _ = blocks.shape
        out[base] = DecodedWeight(base, "mxfp4", (blocks, scales), (n_exp, n_groups * MXFP4_BLOCK, n_out))
    return out


class _SmallTensorReader:
    """Reads the values of tiny integer tensors (INT4 ``weight_shape``) while indexing, keeping files open."""

    def __init__(self, root: Path):
        self.root = root
        self._files: dict[str, object] = {}

    def values(self, info: TensorInfo) -> list[int]:
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(self.root / info.file, "rb")  # noqa: SIM115 - closed in __exit__
        f.seek(info.begin)
        raw = f.read(info.nbytes)
        if len(raw) != info.nbytes:
            raise _fail(self.root / info.file, "file ends before the tensor's data (truncated shard?)", info.name)
        return torch.frombuffer(bytearray(raw), dtype=DTYPES[info.dtype][0]).tolist()

    def __enter__(self) -> _SmallTensorReader:
        return self

    def __exit__(self, *exc) -> None:
        for f in self._files.values():
            f.close()


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


# Where huggingface_hub keeps downloaded repositories (its documented cache layout, read offline only):
# <cache>/models--<org>--<name>/{refs/<ref>, snapshots/<commit>/<files>}.
def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hub"


def resolve_checkpoint_dir(spec: str | os.PathLike) -> Path:
    """A checkpoint directory, or a Hub id (``org/name`` or ``org/name@revision``) already in the local cache.

    Never downloads: a Hub id that is not cached is an error that says how to fetch it.
    """
    path = Path(spec)
    text = os.fspath(spec)
    if path.exists() or os.path.isabs(text) or text.startswith(".") or text.count("/") != 1:
        return path
    repo, _, revision = text.partition("@")
    org, name = repo.split("/")
    if not org or not name:
        return path
    cache = _hub_cache_dir() / f"models--{org}--{name}"
    revision = revision or "main"
    ref = cache / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = cache / "snapshots" / commit
    if not snapshot.is_dir():
        raise CheckpointError(
            f"{text}: not a directory, and not in the local Hugging Face cache ({cache}, revision {revision}); "
            f"this tool never downloads: fetch it first (e.g. `huggingface-cli download {repo}`)"
        )
    return snapshot


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
        header, data_start = read_header(path)
        file_sizes[rel] = path.stat().st_size
        for name, entry in header.items():
            if name in tensors:
                raise _fail(path, f"tensor also stored in {tensors[name].file}", name)
            begin, end = entry["data_offsets"]
            tensors[name] = TensorInfo(
                name, entry["dtype"], tuple(entry["shape"]), rel, data_start + begin, data_start + end
            )
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
