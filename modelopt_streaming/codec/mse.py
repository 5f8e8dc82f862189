"""MSE block-scale search (``quantize --algorithm mse``): data-free, the same contract as ``nvfp4.quantize``.

For each 16-value block, rtn (``nvfp4``) takes the E4M3 scale nearest to ``block_amax / (6 * weight_scale_2)``.
That scale maps the block's largest value onto 6, whatever the other fifteen values are; a slightly smaller
scale often serves the rest of the block better (finer steps, the outlier clipped a little), and a larger one
(about 1.5 x, the largest value on the E2M1 level 4 instead of 6) puts the other levels where the values are
for many blocks. Here each block tries rtn's scale and its neighbours on the E4M3 grid, encodes the block with
each exactly as rtn does, and keeps the one whose reconstruction has the smallest squared error against the
source. The output is an ordinary NVFP4 tensor: consumers need nothing new.

Guarantee: rtn's scale is tried first and a candidate replaces the current best only with a strictly smaller
error, so no block's error exceeds rtn's, and a block where nothing is better keeps rtn's bytes exactly.

Bytes are the same on every device: every operation is elementwise IEEE float32 (true division, separate
multiplies and adds, which PyTorch's eager kernels never contract into FMAs) and the 16 squared errors of a
block are added in one written-out pairwise order instead of a ``sum`` whose reduction order is the device's.
"""

from __future__ import annotations

import torch

from modelopt_streaming.codec import nvfp4
from modelopt_streaming.formats.nvfp4 import BLOCK_SIZE, E2M1_VALUES

__all__ = ["DEFAULT_ABOVE", "DEFAULT_BELOW", "E4M3_MAX_CODE", "candidate_offsets", "quantize", "quantize_with_error"]

# Candidates: rtn's E4M3 code, DEFAULT_BELOW codes below it and DEFAULT_ABOVE codes above it. Adjacent E4M3
# codes are adjacent values, 1/16 to 1/8 of the scale apart in the normal range. Measured on random weights
# (docs/quality.md, bench/mse_quality.py): one or two codes below win about a fifth of the blocks (finer steps,
# the largest value clipped a little), the third below almost never; above, the 4th to 6th codes (about 1.5 x
# rtn's scale, where the block's largest value lands on the E2M1 level 4 instead of 6) win about a quarter of
# the blocks and a third of the whole gain; the 7th and beyond win under one block in ten thousand.
DEFAULT_BELOW = 2
DEFAULT_ABOVE = 6
# 0x7E is 448, the E4M3 maximum (0x7F is NaN); 0x01 is 2^-9, rtn's lower clamp (0x00 would be a zero scale).
E4M3_MAX_CODE = 0x7E
_E4M3_MIN_CODE = 0x01
_NAN_CODE = 0x7F

# Rows searched at once: each candidate's pass holds about eight float32-sized temporaries per element, so
# this bounds the scratch (~70 MB) whatever the weight's size. On a GPU larger pieces keep the kernels long
# enough that launching them costs nothing (about 600 MB of its memory).
_ROWS_PER_CHUNK_ELEMS = 2 * 1024 * 1024
_ROWS_PER_CHUNK_ELEMS_CUDA = 16 * 1024 * 1024


def candidate_offsets(below: int = DEFAULT_BELOW, above: int = DEFAULT_ABOVE) -> tuple[int, ...]:
    """E4M3 code offsets from rtn's, in the order they are tried: rtn first, then nearest first, below before
    above at the same distance (a tie between two candidates keeps the one tried first)."""
    if below < 0 or above < 0:
        raise ValueError(f"candidate counts must be non-negative, got below={below}, above={above}")
    out = [0]
    for d in range(1, max(below, above) + 1):
        if d <= below:
            out.append(-d)
        if d <= above:
            out.append(d)
    return tuple(out)


def _signed_e2m1(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=device)


def _block_error(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Sum of the 16 squared errors of each block [..., 16] -> [...], added pairwise in a fixed order."""
    d = x - recon
    s = d * d
    s = s[..., 0::2] + s[..., 1::2]
    s = s[..., 0::2] + s[..., 1::2]
    s = s[..., 0::2] + s[..., 1::2]
    return s[..., 0] + s[..., 1]


def _encode(x: torch.Tensor, scale_bits: torch.Tensor, weight_scale_2: torch.Tensor, table: torch.Tensor):
    """rtn's encoding of blocks ``x`` [R, nb, 16] (float32) under given E4M3 scale bits [R, nb]: the codes,
    and the blocks' squared reconstruction errors. The reconstruction is ``E2M1 * (fp32(scale) *
    weight_scale_2)``, the product formed first: what ModelOpt's ``NVFP4QTensor.dequantize`` and
    ``nvfp4.dequantize`` give, and the divisor rtn divides by."""
    divisor = (scale_bits.view(torch.float8_e4m3fn).float() * weight_scale_2).unsqueeze(-1)
    codes = nvfp4.e2m1_codes(x / divisor)
    recon = table[codes.int()] * divisor
    return codes, _block_error(x, recon)


def _search_rows(
    rows: torch.Tensor, weight_scale_2: torch.Tensor, offsets: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [R, nb, 16], scale bits [R, nb], block errors [R, nb]) of the best candidate of every block."""
    blocks = rows.reshape(rows.shape[0], -1, BLOCK_SIZE)
    x = blocks.float()
    table = _signed_e2m1(rows.device)
    rtn_bits = nvfp4._block_scales(blocks, weight_scale_2).view(torch.uint8)
    best_codes, best_err = _encode(x, rtn_bits, weight_scale_2, table)
    best_bits = rtn_bits
    # A NaN block (only with --allow_nonfinite) keeps rtn's bytes: its scale is no point on the grid.
    searchable = rtn_bits != _NAN_CODE
    base = rtn_bits.to(torch.int16)
    for offset in offsets:
        if offset == 0:
            continue
        code = base + offset
        ok = searchable & (code >= _E4M3_MIN_CODE) & (code <= E4M3_MAX_CODE)
        bits = code.clamp(_E4M3_MIN_CODE, E4M3_MAX_CODE).to(torch.uint8)
        codes, err = _encode(x, bits, weight_scale_2, table)
        # Strictly smaller wins (a NaN error never does): ties keep the earlier candidate, rtn's first.
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_bits = torch.where(better, bits, best_bits)
        best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
    return best_codes, best_bits, best_err


def _check_2d(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"NVFP4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if weight.shape[1] % BLOCK_SIZE:
        raise ValueError(f"input dim {weight.shape[1]} is not a multiple of {BLOCK_SIZE}")


def quantize_with_error(
    weight: torch.Tensor,
    weight_scale_2: torch.Tensor,
    below: int = DEFAULT_BELOW,
    above: int = DEFAULT_ABOVE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize``, also returning each block's squared reconstruction error (float32 [out, in/16]): the
    value the search minimized, for tests and measurements."""
    _check_2d(weight)
    n_out, n_in = weight.shape
    weight_scale_2 = weight_scale_2.to(device=weight.device, dtype=torch.float32)
    offsets = candidate_offsets(below, above)
    packed = torch.empty((n_out, n_in // 2), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((n_out, n_in // BLOCK_SIZE), dtype=torch.uint8, device=weight.device)
    errors = torch.empty((n_out, n_in // BLOCK_SIZE), dtype=torch.float32, device=weight.device)
    chunk = _ROWS_PER_CHUNK_ELEMS_CUDA if weight.is_cuda else _ROWS_PER_CHUNK_ELEMS
    rows_per_chunk = max(1, chunk // max(1, n_in))
    for start in range(0, n_out, rows_per_chunk):
        stop = min(n_out, start + rows_per_chunk)
        codes, bits, err = _search_rows(weight[start:stop], weight_scale_2, offsets)
        packed[start:stop] = nvfp4.pack_nibbles(codes.reshape(stop - start, n_in))
        scales[start:stop], errors[start:stop] = bits, err
    return packed, scales.view(torch.float8_e4m3fn), errors


def quantize(
    weight: torch.Tensor,
    weight_scale_2: torch.Tensor,
    below: int = DEFAULT_BELOW,
    above: int = DEFAULT_ABOVE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight [out, in] against a given global scale, each block's E4M3 scale chosen among
    rtn's and its ``below``/``above`` neighbours on the E4M3 grid by the smallest squared error.

    Returns ``(packed uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16])``, as ``nvfp4.quantize``;
    on any device the same bytes.
    """
    packed, scales, _ = quantize_with_error(weight, weight_scale_2, below, above)
    return packed, scales
