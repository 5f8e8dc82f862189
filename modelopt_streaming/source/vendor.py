"""Vendor encodings of source weights (spec section 6), read back as bf16 without a bf16 copy on disk.

Three encodings: DeepSeek-V3/R1's 128 x 128 block FP8, compressed-tensors ``pack-quantized`` INT4 (Kimi-K2
routed experts) and OCP MXFP4 (GPT-OSS's 3-D experts). ``decoded_weights`` finds and checks them in the
index at plan time, so a malformed source is a one-line error before any output; the ``decode_*`` functions
are pure tensor math (tensors in, bf16 out, in bounded bands); ``read_source`` composes the reader's bytes
with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelopt_streaming.errors import CheckpointError
from modelopt_streaming.formats.nvfp4 import unpack_e2m1
from modelopt_streaming.source.index import DTYPES, FLOAT_DTYPES, CheckpointIndex, TensorInfo
from modelopt_streaming.source.reader import TensorReader

__all__ = [
    "FP8_BLOCK",
    "MXFP4_BLOCK",
    "DecodedWeight",
    "decode",
    "decode_fp8_block",
    "decode_int4_pack",
    "read_dtype",
    "decode_mxfp4",
    "decoded_weights",
    "read_source",
]

# DeepSeek-V3/R1 publish FP8 weights in 128 x 128 blocks, each with a float32 inverse scale.
FP8_BLOCK = 128
# OCP MXFP4: 32 E2M1 values share one E8M0 scale.
MXFP4_BLOCK = 32
# Rows of an INT4 weight decoded at once: the float32 temporaries stay small whatever the weight's size.
_INT4_BAND_ROWS = 1024


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


# -- detection and checks, at plan time ----------------------------------------------------------------------


def decoded_weights(index: CheckpointIndex) -> dict[str, DecodedWeight]:
    """Source weights that need decoding, by the name of the weight they stand for.

    Args:
        index: the source checkpoint's index; its config gives the INT4 group size.

    Returns:
        One DecodedWeight per FP8-block, INT4-pack and MXFP4 weight; their scale (and shape) tensors are
        its parts, consumed with it.

    Raises:
        CheckpointError: a weight in one of these encodings whose companion tensors are missing or do not
            fit it (shape, dtype, group size); the message names the file and the tensor.
    """
    out = _fp8_block_weights(index)
    out.update(_int4_packed_weights(index))
    out.update(_mxfp4_weights(index))
    return out


def _fp8_block_weights(index: CheckpointIndex) -> dict[str, DecodedWeight]:
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
    with TensorReader(index.root) as small:
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
            rows, cols = small.read(shape).reshape(-1).tolist()
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


# -- decoding: pure tensor math ------------------------------------------------------------------------------


def decode_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, *, pin_memory: bool = False) -> torch.Tensor:
    """DeepSeek block FP8 to bf16: ``bf16(f32(weight) * scale_inv[i // 128, j // 128])``.

    Args:
        weight: float8_e4m3fn [out, in].
        scale_inv: float32 [ceil(out/128), ceil(in/128)].
        pin_memory: allocate the result in page-locked memory (for a copy to the GPU).

    Returns:
        bf16 [out, in], decoded one 128-row band at a time so the float32 temporaries stay at 128 rows.
    """
    rows, cols = weight.shape
    out = torch.empty((rows, cols), dtype=torch.bfloat16, pin_memory=pin_memory)
    for i, r0 in enumerate(range(0, rows, FP8_BLOCK)):
        r1 = min(rows, r0 + FP8_BLOCK)
        band_scale = scale_inv[i].repeat_interleave(FP8_BLOCK)[:cols]
        out[r0:r1] = (weight[r0:r1].float() * band_scale).to(torch.bfloat16)
    return out


def decode_int4_pack(
    packed: torch.Tensor, scale: torch.Tensor, cols: int, group_size: int, *, pin_memory: bool = False
) -> torch.Tensor:
    """compressed-tensors ``pack-quantized`` INT4 to bf16: ``bf16((nibble - 8) * scale[:, j // group_size])``.

    Args:
        packed: int32 [out, ceil(cols/8)]; element j of a row is bits 4*(j%8) of word j//8, stored as q+8.
        scale: floating [out, ceil(cols/group_size)].
        cols: the weight's input dimension (its ``weight_shape[1]``).
        group_size: values per scale along a row.
        pin_memory: allocate the result in page-locked memory.

    Returns:
        bf16 [out, cols], decoded a band of rows at a time.
    """
    rows = packed.shape[0]
    out = torch.empty((rows, cols), dtype=torch.bfloat16, pin_memory=pin_memory)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    for r0 in range(0, rows, _INT4_BAND_ROWS):
        r1 = min(rows, r0 + _INT4_BAND_ROWS)
        nibbles = (packed[r0:r1].unsqueeze(-1) >> shifts) & 0xF
        q = nibbles.reshape(r1 - r0, -1)[:, :cols].float() - 8.0
        band_scale = scale[r0:r1].float().repeat_interleave(group_size, dim=1)[:, :cols]
        out[r0:r1] = (q * band_scale).to(torch.bfloat16)
    return out


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, *, pin_memory: bool = False) -> torch.Tensor:
    """OCP MXFP4 3-D experts to bf16 ``E2M1[code] * 2^(scale - 127)``, transposed to [E, in, out].

    Exact: a power of two times a 2-bit significand, computed in float32 (within its range) and exact in
    bf16 too.

    Args:
        blocks: uint8 [E, out, in/32, 16], two E2M1 codes a byte, the even input in the low nibble.
        scales: uint8 [E, out, in/32], E8M0 exponents biased by 127.
        pin_memory: allocate the result in page-locked memory.

    Returns:
        bf16 [E, in, out], decoded one expert at a time.
    """
    n_exp, n_out, n_groups, _ = blocks.shape
    n_in = n_groups * MXFP4_BLOCK
    out = torch.empty((n_exp, n_in, n_out), dtype=torch.bfloat16, pin_memory=pin_memory)
    for e in range(n_exp):
        values = unpack_e2m1(blocks[e]).reshape(n_out, n_in)
        exponent = (scales[e].to(torch.float32) - 127.0).repeat_interleave(MXFP4_BLOCK, dim=1)
        out[e] = torch.ldexp(values, exponent).t().to(torch.bfloat16)
    return out


def decode(weight: DecodedWeight, parts: Sequence[torch.Tensor], *, pin_memory: bool = False) -> torch.Tensor:
    """The bf16 value of ``weight`` from its parts' tensors, given in the order of ``weight.parts``."""
    if weight.encoding == "fp8_block":
        return decode_fp8_block(*parts, pin_memory=pin_memory)
    if weight.encoding == "mxfp4":
        return decode_mxfp4(*parts, pin_memory=pin_memory)
    if weight.encoding == "int4_pack":
        packed, scale, _shape = parts
        return decode_int4_pack(packed, scale, weight.shape[1], weight.group_size, pin_memory=pin_memory)
    raise ValueError(f"unknown source encoding {weight.encoding!r}")


# -- reading: the reader's bytes, decoded ------------------------------------------------------------------------


def read_dtype(source: TensorInfo | DecodedWeight) -> torch.dtype:
    """The dtype ``read_source`` gives a source tensor in: its stored one, bf16 for a DecodedWeight."""
    return torch.bfloat16 if isinstance(source, DecodedWeight) else DTYPES[source.dtype][0]


def read_source(
    reader: TensorReader,
    source: TensorInfo | DecodedWeight,
    device: torch.device | None = None,
    stream: torch.cuda.Stream | None = None,
) -> torch.Tensor:
    """One source tensor as a fresh tensor: a stored one as ``reader.read`` gives it, a DecodedWeight as bf16.

    Args:
        reader: the reader of the source checkpoint.
        source: an index entry, or a weight to decode (its parts are read whole, then decoded in bands).
        device: a CUDA device to put the result on (copied on ``stream``; the caller waits for the stream);
            None or a CPU device gives a CPU tensor.
        stream: the CUDA stream of the copy; the device's current stream by default.

    Returns:
        The tensor, in its stored dtype and shape, or bf16 in the DecodedWeight's shape.

    Raises:
        CheckpointError: a shard ends before the tensor's data, or an INT4 weight_shape changed since planning.
    """
    if isinstance(source, TensorInfo):
        return reader.read(source, device=device, stream=stream)
    parts = [reader.read(p) for p in source.parts]
    if source.encoding == "int4_pack":
        # Checked at plan time (decoded_weights); a different value now means the file changed under the run.
        shape_info, shape = source.parts[2], parts[2]
        if shape.numel() != 2 or tuple(int(v) for v in shape.reshape(-1)) != source.shape:
            raise CheckpointError(
                f"{reader.root / shape_info.file}, tensor {shape_info.name!r}: "
                f"{shape.tolist()} disagrees with the packed weight and scale {source.shape}"
            )
    on_gpu = device is not None and device.type == "cuda"
    # Pinned on the way to a GPU, so that the copy below is asynchronous.
    decoded = decode(source, parts, pin_memory=on_gpu)
    if not on_gpu:
        return decoded
    with torch.cuda.stream(stream or torch.cuda.current_stream(device)):
        return decoded.to(device, non_blocking=True)
