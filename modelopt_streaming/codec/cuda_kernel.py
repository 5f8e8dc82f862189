"""The fused CUDA codec: one Triton kernel reads each weight once and writes packed codes and block
scales, computing the reference codec's float32 operations in the same order (IEEE divisions through
``tl.div_rn``, the E4M3 rounding by integer arithmetic), so the bytes equal the CPU's. ``available()`` is
False without Triton or CUDA; the runner then uses the torch reference codec on the GPU."""

from __future__ import annotations

import contextlib
from functools import cache

import torch

from modelopt_streaming.codec import mse

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if triton is not None:

    @triton.jit
    def _to_e4m3(s):
        """float32 in [2^-9, 448] or NaN -> float8_e4m3fn bits (uint32), round to nearest even."""
        bits = s.to(tl.uint32, bitcast=True)
        exp = ((bits >> 23) & 0xFF).to(tl.int32) - 127
        man = bits & 0x7FFFFF
        top = man >> 20
        rest = man & 0xFFFFF
        up = (rest > 0x80000) | ((rest == 0x80000) & ((top & 1) == 1))
        normal = ((exp + 7).to(tl.uint32) << 3) + top + up.to(tl.uint32)
        normal = tl.minimum(normal, 126)
        # Subnormal: k = round-half-even(s * 2^9) in [1, 8] (the scaling is exact); 8 is the smallest normal.
        k = s * 512.0
        f = tl.floor(k)
        d = k - f
        sub = (f + ((d > 0.5) | ((d == 0.5) & (f % 2.0 == 1.0))).to(tl.float32)).to(tl.uint32)
        code = tl.where(exp < -6, sub, normal)
        return tl.where(s != s, 0x7F, code)

    @triton.jit
    def _e4m3_value(code):
        """float32 value of non-negative float8_e4m3fn bits (0x7F is NaN), built bit by bit."""
        exp = (code >> 3).to(tl.uint32)
        man = (code & 7).to(tl.uint32)
        normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
        sub = man.to(tl.float32) * 0.001953125
        value = tl.where(exp == 0, sub, normal)
        return tl.where(code == 0x7F, float("nan"), value)

    @triton.jit
    def _quantize_kernel(
        x_ptr, packed_ptr, scale_ptr, ws2_ptr, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None].to(tl.int64) * cols + c[None, :], mask=mask, other=0.0).to(tl.float32)
        ws2 = tl.load(ws2_ptr)
        nb: tl.constexpr = BLOCK_C // 16
        xb = tl.reshape(x, (BLOCK_R, nb, 16))
        # max(|max|, |min|) with NaN kept: the bits of |x| order like |x|, NaN above infinity.
        absbits = xb.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        m = tl.max(absbits, axis=2)
        amax = tl.where(m > 0x7F800000, float("nan"), m.to(tl.float32, bitcast=True))
        s = tl.div_rn(amax, 6.0 * ws2)
        s = tl.where(s == 0.0, 1.0, s)
        s = tl.where(s != s, s, tl.minimum(tl.maximum(s, 0.001953125), 448.0))
        code8 = _to_e4m3(s)
        divisor = _e4m3_value(code8) * ws2
        q = tl.div_rn(xb, divisor[:, :, None])
        a = tl.abs(q)
        code = (
            (a > 0.25).to(tl.int32)
            + (a >= 0.75).to(tl.int32)
            + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32)
            + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32)
        )
        code = tl.where(q != q, 7, code)
        code = code | ((q < 0.0).to(tl.int32) << 3)
        pairs = tl.reshape(code, (BLOCK_R, BLOCK_C // 2, 2))
        lo, hi = tl.split(pairs)
        packed = (lo | (hi << 4)).to(tl.uint8)
        pc = pid_c * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
        pmask = (r[:, None] < rows) & (pc[None, :] < cols // 2)
        tl.store(packed_ptr + r[:, None].to(tl.int64) * (cols // 2) + pc[None, :], packed, mask=pmask)
        sc = pid_c * nb + tl.arange(0, nb)
        smask = (r[:, None] < rows) & (sc[None, :] < cols // 16)
        tl.store(scale_ptr + r[:, None].to(tl.int64) * (cols // 16) + sc[None, :], code8.to(tl.uint8), mask=smask)

    @triton.jit
    def _e2m1_encode(xb, divisor):
        """rtn's E2M1 codes of blocks ``xb`` [R, nb, 16] under ``divisor`` [R, nb], and each block's squared error
        against ``E2M1 * divisor``, its 16 terms added pairwise in codec/mse.py's order."""
        q = tl.div_rn(xb, divisor[:, :, None])
        a = tl.abs(q)
        mag = (
            (a > 0.25).to(tl.int32)
            + (a >= 0.75).to(tl.int32)
            + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32)
            + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32)
        )
        mag = tl.where(q != q, 7, mag)
        negative = q < 0.0
        code = mag | (negative.to(tl.int32) << 3)
        # E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 from the code, exactly.
        m = mag.to(tl.float32)
        value = tl.where(mag < 4, m * 0.5, tl.where(mag < 6, m - 2.0, tl.where(mag == 6, 4.0, 6.0)))
        value = tl.where(negative, -value, value)
        d = xb - value * divisor[:, :, None]
        sq = d * d
        R: tl.constexpr = sq.shape[0]
        NB: tl.constexpr = sq.shape[1]
        lo, hi = tl.split(tl.reshape(sq, (R, NB, 8, 2)))
        lo, hi = tl.split(tl.reshape(lo + hi, (R, NB, 4, 2)))
        lo, hi = tl.split(tl.reshape(lo + hi, (R, NB, 2, 2)))
        lo, hi = tl.split(lo + hi)
        return code, lo + hi

    @triton.jit
    def _mse_try(xb, ws2, rtn8, offset: tl.constexpr, best8, best_codes, best_err):
        cand = rtn8.to(tl.int32) + offset
        ok = (rtn8 != 0x7F) & (cand >= 1) & (cand <= 0x7E)
        cand = tl.minimum(tl.maximum(cand, 1), 0x7E).to(tl.uint32)
        codes, err = _e2m1_encode(xb, _e4m3_value(cand) * ws2)
        better = ok & (err < best_err)
        best_err = tl.where(better, err, best_err)
        best8 = tl.where(better, cand, best8)
        best_codes = tl.where(better[:, :, None], codes, best_codes)
        return best8, best_codes, best_err

    @triton.jit
    def _mse_kernel(
        x_ptr,
        packed_ptr,
        scale_ptr,
        ws2_ptr,
        rows,
        cols,
        BELOW: tl.constexpr,
        ABOVE: tl.constexpr,
        REACH: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """codec/mse.py's search for one tile: rtn's scale first, then the candidates in its order."""
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None].to(tl.int64) * cols + c[None, :], mask=mask, other=0.0).to(tl.float32)
        ws2 = tl.load(ws2_ptr)
        nb: tl.constexpr = BLOCK_C // 16
        xb = tl.reshape(x, (BLOCK_R, nb, 16))
        absbits = xb.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        m = tl.max(absbits, axis=2)
        amax = tl.where(m > 0x7F800000, float("nan"), m.to(tl.float32, bitcast=True))
        s = tl.div_rn(amax, 6.0 * ws2)
        s = tl.where(s == 0.0, 1.0, s)
        s = tl.where(s != s, s, tl.minimum(tl.maximum(s, 0.001953125), 448.0))
        rtn8 = _to_e4m3(s)
        best8 = rtn8
        best_codes, best_err = _e2m1_encode(xb, _e4m3_value(rtn8) * ws2)
        for d in tl.static_range(1, REACH + 1):
            if d <= BELOW:
                best8, best_codes, best_err = _mse_try(xb, ws2, rtn8, -d, best8, best_codes, best_err)
            if d <= ABOVE:
                best8, best_codes, best_err = _mse_try(xb, ws2, rtn8, d, best8, best_codes, best_err)
        pairs = tl.reshape(best_codes, (BLOCK_R, BLOCK_C // 2, 2))
        lo, hi = tl.split(pairs)
        packed = (lo | (hi << 4)).to(tl.uint8)
        pc = pid_c * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
        pmask = (r[:, None] < rows) & (pc[None, :] < cols // 2)
        tl.store(packed_ptr + r[:, None].to(tl.int64) * (cols // 2) + pc[None, :], packed, mask=pmask)
        sc = pid_c * nb + tl.arange(0, nb)
        smask = (r[:, None] < rows) & (sc[None, :] < cols // 16)
        tl.store(scale_ptr + r[:, None].to(tl.int64) * (cols // 16) + sc[None, :], best8.to(tl.uint8), mask=smask)


@cache
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def supports(weight: torch.Tensor) -> bool:
    return available() and weight.is_cuda and weight.dtype in _SOURCE_DTYPES


def quantize(
    weight: torch.Tensor, weight_scale_2: torch.Tensor, block_r: int = 16, block_c: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and bytes as ``nvfp4.quantize``, for a CUDA tensor."""
    if weight.dim() != 2 or weight.shape[1] % 16:
        raise ValueError(f"NVFP4 quantizes 2-D weights with input dim % 16 == 0, got {tuple(weight.shape)}")
    w = weight.contiguous()
    rows, cols = w.shape
    packed = torch.empty((rows, cols // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((rows, cols // 16), dtype=torch.uint8, device=w.device)
    ws2 = weight_scale_2.to(device=w.device, dtype=torch.float32).reshape(1)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    # Triton launches on the *current* CUDA device, not the tensor's: without this guard a weight on
    # cuda:1 would be read by a kernel running on cuda:0 (an illegal access, or silent peer traffic).
    # (Triton's interpreter, used in CI without a GPU, runs on CPU tensors and needs no guard.)
    with torch.cuda.device(w.device) if w.is_cuda else contextlib.nullcontext():
        _quantize_kernel[grid](w, packed, scales, ws2, rows, cols, BLOCK_R=block_r, BLOCK_C=block_c)
    return packed, scales.view(torch.float8_e4m3fn)


def quantize_mse(
    weight: torch.Tensor,
    weight_scale_2: torch.Tensor,
    below: int = mse.DEFAULT_BELOW,
    above: int = mse.DEFAULT_ABOVE,
    block_r: int = 16,
    block_c: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and bytes as ``mse.quantize``, for a CUDA tensor: the whole search in one pass over the
    weight, each candidate's encoding in registers.

    Launched with ``enable_fp_fusion=False``: LLVM would otherwise contract ``x - value * divisor`` and the
    error sums into FMAs, whose single rounding gives other errors than the CPU's, and so other choices."""
    if weight.dim() != 2 or weight.shape[1] % 16:
        raise ValueError(f"NVFP4 quantizes 2-D weights with input dim % 16 == 0, got {tuple(weight.shape)}")
    mse.candidate_offsets(below, above)  # the same ValueError as the reference for a negative count
    w = weight.contiguous()
    rows, cols = w.shape
    packed = torch.empty((rows, cols // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((rows, cols // 16), dtype=torch.uint8, device=w.device)
    ws2 = weight_scale_2.to(device=w.device, dtype=torch.float32).reshape(1)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    with torch.cuda.device(w.device) if w.is_cuda else contextlib.nullcontext():
        _mse_kernel[grid](
            w,
            packed,
            scales,
            ws2,
            rows,
            cols,
            BELOW=below,
            ABOVE=above,
            REACH=max(below, above),
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            enable_fp_fusion=False,
        )
    return packed, scales.view(torch.float8_e4m3fn)
