"""NVFP4 codec: float tensor in, (packed E2M1, E4M3 block scales, float32 global scale) out, and back.

Pure tensor math: no files, no names, no config. The arithmetic follows NVIDIA ModelOpt's
``NVFP4QTensor`` (modelopt/torch/quantization/qtensor/nvfp4_tensor.py, 0.45+) operation by operation,
so that every byte matches; ``../shared/nvfp4-spec.md`` section 1 states the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from modelopt_streaming.formats.nvfp4 import BLOCK_SIZE, E2M1_MAX, E4M3_MAX, E4M3_MIN_SCALE, unpack_e2m1

# Rounding thresholds between consecutive magnitudes. At a tie the even code wins: a value equal to
# a threshold rounds down when the lower code is even (0.25, 1.25, 2.5, 5.0) and up when the upper
# code is even (0.75, 1.75, 3.5).
_ROUND_DOWN_AT_TIE = (0.25, 1.25, 2.5, 5.0)
_ROUND_UP_AT_TIE = (0.75, 1.75, 3.5)

# fp32(1/2688): ModelOpt's ``amax / 2688.0`` on a CUDA tensor is computed by torch as a multiply by
# the float32 reciprocal of the scalar, which NVIDIA's published checkpoints carry.
_INV_2688_F32 = torch.tensor(1.0 / (E2M1_MAX * E4M3_MAX), dtype=torch.float32)

ScaleMath = Literal["cuda", "cpu"]

# Rows quantized at once: bounds the float32 temporaries (about 5 x 4 bytes per element) whatever
# the weight's size, so a 18432 x 7168 weight needs ~40 MB of scratch rather than ~2.6 GB.
_ROWS_PER_CHUNK_ELEMS = 2 * 1024 * 1024


def tensor_amax(weight: torch.Tensor) -> torch.Tensor:
    """max|W| as a float32 0-dim tensor, computed in the source dtype (exact: max is exact).

    NaN propagates, as in ModelOpt's ``reduce_amax``.
    """
    return torch.maximum(weight.max().abs(), weight.min().abs()).float()


# The global scale of an all-zero weight (or fused group), where ModelOpt's formula gives 0 and its block
# scales become 0/0 = NaN. With 1.0 every block is an all-zero block (scale 1.0, as ModelOpt writes such
# blocks) and every code is 0, so the weight dequantizes to exact zeros; and every use a consumer makes of
# the global scale stays finite: vLLM uses it raw as the GEMM global scale, multiplies it into alpha, inverts
# it (compressed-tensors' weight_global_scale, vLLM's humming kernel), and refuses NaN block scales as "never
# loaded" (vllm/model_executor/layers/quantization/modelopt.py, KNvfp4Static.process).
# docs/codec.md records this one deviation from ModelOpt's bytes.
ZERO_WEIGHT_SCALE_2 = 1.0


def weight_scale_2_from_amax(amax: torch.Tensor, scale_math: ScaleMath = "cuda") -> torch.Tensor:
    """Global scale ``amax / (6 * 448)`` as ModelOpt computes it on CUDA (default) or on the CPU, and
    ``ZERO_WEIGHT_SCALE_2`` for amax 0."""
    amax = amax.float()
    if scale_math == "cuda":
        scale_2 = amax * _INV_2688_F32.to(amax.device)
    elif scale_math == "cpu":
        scale_2 = amax / (E2M1_MAX * E4M3_MAX)
    else:
        raise ValueError(f"scale_math must be 'cuda' or 'cpu', not {scale_math!r}")
    return torch.where(amax == 0, torch.full_like(scale_2, ZERO_WEIGHT_SCALE_2), scale_2)


def _block_scales(blocks: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """E4M3 scale of each 16-element block; ``blocks`` is [..., n_blocks, 16] in the source dtype."""
    block_amax = torch.maximum(blocks.amax(-1).abs(), blocks.amin(-1).abs()).float()
    scale = block_amax / (E2M1_MAX * weight_scale_2)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    bits = scale.clamp(min=E4M3_MIN_SCALE, max=E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    # A block holding NaN (only with --allow_nonfinite) gets a NaN scale; its sign bit depends on how the
    # device made the NaN, so every codec writes the one pattern 0x7F and the bytes agree across devices.
    bits = torch.where(bits == 0xFF, torch.full_like(bits, 0x7F), bits)
    return bits.view(torch.float8_e4m3fn)


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 code of each float32 value: nearest magnitude, ties to the even code.

    Values above 5, infinities and NaN saturate to magnitude code 7; the sign bit is set for q < 0
    (so -0.0 gives 0, and a tiny negative that rounds to zero gives 8).
    """
    mag = q.abs()
    code = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for threshold in _ROUND_DOWN_AT_TIE:
        code += mag > threshold
    for threshold in _ROUND_UP_AT_TIE:
        code += mag >= threshold
    code = torch.where(torch.isnan(q), torch.full_like(code, 7), code)
    code += (q < 0).to(torch.uint8) << 3
    return code


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim, first element in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _quantize_rows(rows: torch.Tensor, weight_scale_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = rows.reshape(rows.shape[0], -1, BLOCK_SIZE)
    weight_scale = _block_scales(blocks, weight_scale_2)
    divisor = weight_scale.float() * weight_scale_2
    q = blocks.float() / divisor.unsqueeze(-1)
    codes = e2m1_codes(q).reshape(rows.shape)
    return pack_nibbles(codes), weight_scale


def quantize(weight: torch.Tensor, weight_scale_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight [out, in] against a given global scale.

    Returns ``(packed uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16])``. The global
    scale is an argument because a fused group shares one; see ``weight_scale_2_from_amax``.
    """
    if weight.dim() != 2:
        raise ValueError(f"NVFP4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    if n_in % BLOCK_SIZE:
        raise ValueError(f"input dim {n_in} is not a multiple of {BLOCK_SIZE}")
    weight_scale_2 = weight_scale_2.to(device=weight.device, dtype=torch.float32)
    packed = torch.empty((n_out, n_in // 2), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((n_out, n_in // BLOCK_SIZE), dtype=torch.float8_e4m3fn, device=weight.device)
    rows_per_chunk = max(1, _ROWS_PER_CHUNK_ELEMS // max(1, n_in))
    for start in range(0, n_out, rows_per_chunk):
        stop = min(n_out, start + rows_per_chunk)
        packed[start:stop], scales[start:stop] = _quantize_rows(weight[start:stop], weight_scale_2)
    return packed, scales


def quantize_experts(
    weight: torch.Tensor,
    weight_scale_2: torch.Tensor,
    quantize_2d: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = quantize,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fused 3-D experts [E, in, out] (GPT-OSS/Llama-4 ``gate_up_proj``, ``down_proj``) against one
    global scale, with blocks of 16 along ``in``, the layout ModelOpt 0.47 exports.

    Returns ``(packed uint8 [E, in/2, out], weight_scale float8_e4m3fn [E, in/16, out])``: codes of
    consecutive inputs share a byte, as in a 2-D weight. Each expert is transposed to [out, in] and run
    through ``quantize_2d`` (any codec with ``quantize``'s contract), so the scratch is one expert's size.
    """
    if weight.dim() != 3:
        raise ValueError(f"fused experts are 3-D [experts, in, out], got shape {tuple(weight.shape)}")
    n_exp, n_in, n_out = weight.shape
    if n_in % BLOCK_SIZE:
        raise ValueError(f"input dim {n_in} is not a multiple of {BLOCK_SIZE}")
    packed = torch.empty((n_exp, n_in // 2, n_out), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((n_exp, n_in // BLOCK_SIZE, n_out), dtype=torch.uint8, device=weight.device)
    for e in range(n_exp):
        p, s = quantize_2d(weight[e].t().contiguous(), weight_scale_2)
        packed[e] = p.t()
        scales[e] = s.view(torch.uint8).t()
    return packed, scales.view(torch.float8_e4m3fn)


def quantize_tensor(
    weight: torch.Tensor, scale_math: ScaleMath = "cuda"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize one weight on its own: ``(packed, weight_scale, weight_scale_2)``."""
    weight_scale_2 = weight_scale_2_from_amax(tensor_amax(weight), scale_math)
    packed, scales = quantize(weight, weight_scale_2)
    return packed, scales, weight_scale_2


def dequantize(
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``E2M1[code] * fp32(weight_scale) * weight_scale_2``, shape [out, 2 * packed.shape[1]]."""
    values = unpack_e2m1(packed).reshape(packed.shape[0], -1, BLOCK_SIZE)
    block = weight_scale.float() * weight_scale_2.float()
    return (values * block.unsqueeze(-1)).reshape(packed.shape[0], -1).to(dtype)
