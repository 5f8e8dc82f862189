"""``decompress``: a quantized checkpoint back to plain safetensors (bf16, fp16 or fp32) that any framework
loads, streaming, resumable like quantize.

Reads NVFP4 in both dialects (ModelOpt and compressed-tensors ``nvfp4-pack-quantized``, dequantized by the
codec's pure math) and the vendor formats the reader already decodes (DeepSeek 128x128 block FP8, Kimi
compressed-tensors pack-quantized INT4, GPT-OSS MXFP4). Everything else is copied unchanged. config.json
loses its quantization block; scale tensors are dropped with the weights they scale.

Values: a ModelOpt module is ``E2M1[code] * (fp32(weight_scale) * weight_scale_2)`` as ModelOpt's own
``NVFP4QTensor.dequantize`` computes it; a compressed-tensors module ``E2M1[code] * (fp32(weight_scale) /
weight_global_scale)``, the division compressed-tensors' decompressor does
(``quantization/lifecycle/forward_helpers.py``: ``scale = scale / global_scale``); both rounded once to the
output dtype. FP8/INT4/MXFP4 sources come from the reader as bf16 (the dtype DeepSeek's and
compressed-tensors' own conversions produce) and are cast to the output dtype.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modelopt_streaming.codec import nvfp4
from modelopt_streaming.errors import CheckpointError, UsageError
from modelopt_streaming.formats.interchange import COMPRESSED_TENSORS, EXPERTS_3D_SUFFIXES, MODELOPT, PROVENANCE_FILE
from modelopt_streaming.formats.nvfp4 import BLOCK_SIZE
from modelopt_streaming.jobs.convert import quantized_experts_3d
from modelopt_streaming.jobs.shard_copy import write_shards_in_order
from modelopt_streaming.sink.export import copy_side_files, safetensors_index
from modelopt_streaming.sink.export.provenance import provenance
from modelopt_streaming.sink.output_dir import check_paths, job_fingerprint, single_process_job
from modelopt_streaming.sink.writer import write_json_atomic
from modelopt_streaming.source.hub_cache import resolve_checkpoint_dir
from modelopt_streaming.source.index import (
    DTYPE_NAMES,
    DTYPES,
    INDEX_FILE,
    CheckpointIndex,
    TensorInfo,
    TensorSpec,
    build_index,
)
from modelopt_streaming.source.quantized import detect_format, nvfp4_modules
from modelopt_streaming.source.reader import TensorReader
from modelopt_streaming.source.vendor import DecodedWeight, decoded_weights, read_source

__all__ = ["OUTPUT_DTYPES", "DecompressSummary", "decompress", "dequantize_experts_3d", "dequantize_nvfp4"]

OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Rows dequantized at once: the float32 and int64 temporaries stay small whatever the weight's size.
_ROWS_PER_CHUNK_ELEMS = 4 * 1024 * 1024
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One output tensor and what it is made from: ``kind`` "copy" (bytes unchanged), "decoded" (the
    reader's bf16 decoding), "modelopt" / "compressed-tensors" (a 2-D NVFP4 module: weight, block scales,
    global scale), "experts_3d" (ModelOpt's 3-D fused experts)."""

    kind: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    sources: tuple[TensorInfo | DecodedWeight, ...]

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)

    @property
    def position(self) -> tuple[str, int]:
        return min((s.file, s.begin) for s in self.sources)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass
class DecompressSummary:
    input_dir: str
    output_dir: str
    dtype: str
    dequantized: dict[str, int]
    copied: int
    dropped: int
    shards: int
    output_bytes: int
    seconds: float = 0.0

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{k} {v}" for k, v in self.dequantized.items()) or "none"
        return [
            f"dequantized to {self.dtype}: {sum(self.dequantized.values())} weights ({kinds})",
            f"copy: {self.copied} tensors unchanged; {self.dropped} scale tensors dropped",
            f"output: {self.shards} shard(s), {self.output_bytes / 1e9:.3f} GB",
        ] + ([f"time: {self.seconds:.1f} s"] if self.seconds else [])

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def plan_units(index: CheckpointIndex, dtype: str) -> tuple[list[Unit], int]:
    """The output tensors in source order, and how many source tensors are dropped (scales)."""
    out_dtype = DTYPE_NAMES[OUTPUT_DTYPES[dtype]]
    fmt = detect_format(index.config, index.tensors, index.root)
    units: list[Unit] = []
    consumed: set[str] = set()
    if fmt is not None:
        for module, roles in nvfp4_modules(index.tensors, fmt).items():
            packed = roles["weight"]
            if "weight_scale" not in roles or "global" not in roles:
                raise CheckpointError(
                    f"{index.root / packed.file}, tensor {packed.name!r}: packed NVFP4 weight without its "
                    "weight_scale and global scale"
                )
            shape = (packed.shape[0], packed.shape[1] * 2)
            srcs = (packed, roles["weight_scale"], roles["global"])
            units.append(Unit(fmt, f"{module}.weight", out_dtype, shape, srcs))
            consumed.update(r.name for r in roles.values())
        for name in quantized_experts_3d(index.tensors):
            packed = index.tensors[name]
            parts = [index.tensors.get(name + EXPERTS_3D_SUFFIXES[r]) for r in ("weight_scale", "global")]
            if parts[1] is None:
                missing = name + EXPERTS_3D_SUFFIXES["global"]
                raise CheckpointError(f"{index.root / packed.file}, tensor {name!r}: no {missing}")
            n_exp, half_in, n_out = packed.shape
            units.append(Unit("experts_3d", name, out_dtype, (n_exp, half_in * 2, n_out), (packed, *parts)))
            consumed.update(n for n in (name, *(name + s for s in EXPERTS_3D_SUFFIXES.values())) if n in index.tensors)
    # Vendor formats the reader decodes; looked for among what is not NVFP4 (an NVFP4 compressed-tensors
    # ``weight_packed`` is uint8, not the int32 of pack-quantized INT4).
    rest = {n: t for n, t in index.tensors.items() if n not in consumed}
    for name, d in decoded_weights(
        CheckpointIndex(index.root, rest, index.files, index.file_sizes, index.config)
    ).items():
        units.append(Unit("decoded", name, out_dtype, d.shape, (d,)))
        consumed.update(p.name for p in d.parts)
    dropped = len(consumed) - len(units)  # every consumed tensor but the one each unit is named after
    for name, info in index.tensors.items():
        if name in consumed:
            continue
        if fmt is not None and name.rpartition(".")[2] in ("input_scale", "input_global_scale", "k_scale", "v_scale"):
            dropped += 1  # activation scales of the quantized dialect describe no weight
            continue
        units.append(Unit("copy", name, info.dtype, info.shape, (info,)))
    units.sort(key=lambda u: (u.position, u.name))
    return units, dropped


def _lay_out(units: list[Unit], max_shard_size: int) -> list[tuple[str, list[Unit]]]:
    bins: list[list[Unit]] = []
    size = 0
    for unit in units:
        if not bins or (size + unit.nbytes > max_shard_size and bins[-1]):
            bins.append([])
            size = 0
        bins[-1].append(unit)
        size += unit.nbytes
    n = len(bins)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", b) for i, b in enumerate(bins)]


def dequantize_nvfp4(
    packed: torch.Tensor, weight_scale: torch.Tensor, global_scale: torch.Tensor, fmt: str, dtype: torch.dtype
) -> torch.Tensor:
    """One 2-D NVFP4 weight in either dialect, a band of rows at a time."""
    rows = packed.shape[0]
    out = torch.empty((rows, packed.shape[1] * 2), dtype=dtype)
    scalar = global_scale.float().reshape(())
    step = max(1, _ROWS_PER_CHUNK_ELEMS // max(1, packed.shape[1] * 2))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if fmt == COMPRESSED_TENSORS:
            # The block scale as compressed-tensors makes it (fp8 scale / divisor), then used as is.
            block = weight_scale[r0:r1].float() / scalar
            values = nvfp4.dequantize(packed[r0:r1], block, torch.ones((), dtype=torch.float32))
        else:
            values = nvfp4.dequantize(packed[r0:r1], weight_scale[r0:r1], scalar)
        out[r0:r1] = values.to(dtype)
    return out


def dequantize_experts_3d(
    packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """ModelOpt 0.47's 3-D experts: packed [E, in/2, out], block scales [E, in/16, out] -> [E, in, out]."""
    n_exp, half_in, n_out = packed.shape
    out = torch.empty((n_exp, half_in * 2, n_out), dtype=dtype)
    for e in range(n_exp):
        w = dequantize_nvfp4(
            packed[e].t().contiguous(), weight_scale[e].t().contiguous(), weight_scale_2, MODELOPT, dtype
        )
        out[e] = w.t()
    return out


def strip_quantization_config(config: dict) -> dict:
    out = copy.deepcopy(config)
    out.pop("quantization_config", None)
    for key in ("text_config", "language_config"):
        if isinstance(out.get(key), dict):
            out[key].pop("quantization_config", None)
    return out


def decompress(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "bf16",
    *,
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    resume: bool = False,
    verify: bool = False,
) -> DecompressSummary:
    """Write a plain safetensors checkpoint with every quantized weight dequantized to ``dtype``: NVFP4 of
    both dialects and the vendor formats the reader decodes; every other tensor is copied unchanged and the
    scale tensors are dropped. Messages go to the ``modelopt_streaming`` logger.

    Args:
        input_dir: the quantized checkpoint, or a Hub id already in the local cache.
        output_dir: where the plain checkpoint goes (empty, or an earlier output with ``overwrite``).
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``, the dtype of the dequantized weights.
        max_shard_size: largest output shard, in bytes.
        overwrite: replace an earlier output of this tool.
        resume: continue an interrupted run in the same output directory.
        verify: with ``resume``, check finished shards by digest.

    Returns:
        The summary: weights dequantized by kind, tensors copied and dropped, the output's size.

    Raises:
        UsageError: bad options or paths.
        CheckpointError: a quantized weight lacks its scales or they do not fit it.
        OutputStateError: the output directory cannot be used.
    """
    if dtype not in OUTPUT_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if max_shard_size <= 0:
        raise UsageError("--max_shard_size must be positive")
    input_dir = resolve_checkpoint_dir(input_dir)
    output_dir = Path(output_dir)
    check_paths(input_dir, output_dir)
    started = time.monotonic()
    index = build_index(input_dir)
    units, dropped = plan_units(index, dtype)
    shards = _lay_out(units, max_shard_size)
    counts: dict[str, int] = {}
    for u in units:
        if u.kind != "copy":
            kind = u.sources[0].encoding if isinstance(u.sources[0], DecodedWeight) else u.kind
            counts[kind] = counts.get(kind, 0) + 1
    summary = DecompressSummary(
        input_dir=str(input_dir),
        output_dir=str(output_dir),
        dtype=dtype,
        dequantized=dict(sorted(counts.items())),
        copied=sum(u.kind == "copy" for u in units),
        dropped=dropped,
        shards=len(shards),
        output_bytes=sum(u.nbytes for u in units),
    )
    layout = [[f, [[u.kind, u.name, u.dtype, list(u.shape)] for u in us]] for f, us in shards]
    fingerprint = job_fingerprint("decompress", index, {"dtype": dtype, "max_shard_size": max_shard_size}, layout)
    planned = {f: [u.name for u in us] for f, us in shards}
    with single_process_job(
        output_dir, fingerprint, planned, resume=resume, verify=verify, overwrite=overwrite, source_dir=input_dir
    ) as (state, done):
        if done:
            _log.info(f"resuming: {len(done)} of {len(shards)} shards already finished")
        out_dtype = OUTPUT_DTYPES[dtype]

        def content(unit: Unit, reader: TensorReader) -> torch.Tensor | TensorInfo:
            return unit.sources[0] if unit.kind == "copy" else _dense(unit, reader, out_dtype)

        write_shards_in_order(input_dir, state, [(f, us) for f, us in shards if f not in done], content)
        weight_map = {u.name: f for f, us in shards for u in us}
        write_json_atomic(output_dir / INDEX_FILE, safetensors_index(weight_map, summary.output_bytes))
        copied = copy_side_files(input_dir, output_dir)
        records = state.finish(fingerprint, [f for f, _ in shards])
        record = provenance(
            command="decompress",
            options=fingerprint["options"],
            source={"files": index.file_sizes},
            details={"dequantized": summary.dequantized},
            side_files=copied,
            shards=records,
        )
        write_json_atomic(output_dir / PROVENANCE_FILE, record)
        # Last: what a framework loads first, so an unfinished directory never looks loadable.
        write_json_atomic(output_dir / "config.json", strip_quantization_config(index.config))
    summary.seconds = time.monotonic() - started
    return summary


def _dense(unit: Unit, reader: TensorReader, dtype: torch.dtype) -> torch.Tensor:
    if unit.kind == "decoded":
        return read_source(reader, unit.sources[0]).to(dtype)
    packed, scale, global_scale = (reader.read(s) for s in unit.sources)
    if unit.kind == "experts_3d":
        return dequantize_experts_3d(packed, scale, global_scale, dtype)
    if packed.shape[1] * 2 // BLOCK_SIZE != scale.shape[1] or scale.shape[0] != packed.shape[0]:
        src = unit.sources[1]
        raise CheckpointError(
            f"{reader.root / src.file}, tensor {src.name!r}: shape {list(scale.shape)} does not fit packed "
            f"{list(packed.shape)}"
        )
    return dequantize_nvfp4(packed, scale, global_scale, unit.kind, dtype)
