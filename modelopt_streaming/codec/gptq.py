"""GPTQ for NVFP4: the codes of one weight chosen column by column against the inputs' Hessian, the rounding
error of each column fed forward into the columns not yet quantized (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1, and the authors' reference
code ``gptq.py`` ``fasterquant``).

Pure tensor math, like ``nvfp4``: a float weight, the Hessian of its inputs and its scales in, the packed E2M1
codes out. The block scales and the global scale are fixed before the loop (from ``nvfp4``'s round-to-nearest,
or any other search) and only the codes change, so the output is an NVFP4 encoding of the same form as
``nvfp4.quantize``'s: codes by ``nvfp4.e2m1_codes`` of ``w / (fp32(weight_scale) * weight_scale_2)``, packed by
``nvfp4.pack_nibbles``, and a fused group keeps its one global scale.
"""

from __future__ import annotations

import torch

from modelopt_streaming.codec import nvfp4
from modelopt_streaming.formats.nvfp4 import BLOCK_SIZE, E2M1_VALUES

__all__ = [
    "DAMP",
    "GPTQ_BLOCK",
    "MAX_DAMP_TRIES",
    "gptq_codes",
    "gptq_quantize",
    "inverse_hessian_factor",
    "output_error",
]

DAMP = 0.01  # of the mean diagonal, added to the diagonal (the paper's "percdamp")
GPTQ_BLOCK = 128  # columns whose error feeds forward lazily as one matrix product (the paper's B)
# A Hessian that is not positive definite even once damped (rounding of a nearly singular XᵀX in float32) is
# damped ten times more, this many times at most; the same input takes the same steps, so the result stays
# deterministic.
MAX_DAMP_TRIES = 4

_SIGNED_E2M1 = E2M1_VALUES + tuple(-v for v in E2M1_VALUES)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The upper Cholesky factor U of ``(H + damp * mean(diag H) * I)^-1`` (``H^-1 = Uᵀ U``), float32.

    Row i of U from the diagonal on is what the paper's Algorithm 1 multiplies column i's scaled error by: the
    remaining columns' optimal update once column i is fixed, for every later column at once. ``hessian`` must
    already have its dead inputs' diagonal set (``gptq_codes`` does).

    Raises:
        ValueError: the Hessian stays indefinite after MAX_DAMP_TRIES increases of the damping.
    """
    h = hessian.float()
    n = h.shape[0]
    mean_diag = torch.mean(torch.diagonal(h))
    for _ in range(MAX_DAMP_TRIES):
        damped = h.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damp *= 10
    raise ValueError(f"a {n} x {n} Hessian is not positive definite even with damping {damp / 10:g}")


def gptq_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    weight_scale_2: torch.Tensor,
    block_scales: torch.Tensor,
    damp: float = DAMP,
    block_size: int = GPTQ_BLOCK,
    act_order: bool = False,
) -> torch.Tensor:
    """The E2M1 codes (uint8 [out, in], one code per weight, sign in bit 3) GPTQ chooses; see ``gptq_quantize``."""
    if weight.dim() != 2:
        raise ValueError(f"GPTQ quantizes 2-D weights, got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    if n_in % BLOCK_SIZE:
        raise ValueError(f"input dim {n_in} is not a multiple of {BLOCK_SIZE}")
    if tuple(hessian.shape) != (n_in, n_in):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} for a weight of {n_in} inputs")
    if tuple(block_scales.shape) != (n_out, n_in // BLOCK_SIZE):
        raise ValueError(f"block scales of shape {tuple(block_scales.shape)} for a weight {tuple(weight.shape)}")
    device = weight.device
    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    weight_scale_2 = weight_scale_2.to(device=device, dtype=torch.float32)
    # The divisor of every weight, rounded to float32 as nvfp4 rounds it, so that with no error to feed forward
    # (an identity Hessian) the codes are round-to-nearest's, bit for bit.
    divisor = (block_scales.to(device).float() * weight_scale_2).repeat_interleave(BLOCK_SIZE, dim=1)

    # An input that was zero on every calibration token has no curvature: the reference code gives it a unit
    # diagonal (so the factorization exists) and zeroes its weights (their error cannot be seen in the output).
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if act_order:
        # Largest diagonal first, stable so that equal diagonals keep their order on every device.
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h, divisor = w[:, perm], h[perm][:, perm], divisor[:, perm]
    upper = inverse_hessian_factor(h, damp)
    del h

    table = torch.tensor(_SIGNED_E2M1, dtype=torch.float32, device=device)
    codes = torch.empty((n_out, n_in), dtype=torch.uint8, device=device)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, div = w1[:, i], divisor[:, i1 + i]
            code = nvfp4.e2m1_codes(col / div)
            codes[:, i1 + i] = code
            # The dequantized value exactly as a consumer computes it (nvfp4.dequantize): E2M1 * scale product.
            err = (col - table[code.long()] * div) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        # The block's errors reach the later columns in one product (the paper's lazy batch update).
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    weight_scale_2: torch.Tensor,
    block_scales: torch.Tensor,
    damp: float = DAMP,
    block_size: int = GPTQ_BLOCK,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one weight [out, in] in NVFP4 against fixed scales.

    Args:
        weight: the float weight [out, in] (any float dtype; computed in float32).
        hessian: [in, in], ``XᵀX`` of the Linear's calibration inputs up to a positive factor (the result does
            not depend on it but for rounding: the damping is relative to the mean diagonal). Float32.
        weight_scale_2: the global scale (0-dim float32), shared by a fused group.
        block_scales: float8_e4m3fn [out, in/16], fixed beforehand (``nvfp4.quantize``'s, or a search's).
        damp: fraction of the mean diagonal added to the diagonal.
        block_size: columns per lazy batch update (changes only the rounding of the updates).
        act_order: quantize the inputs in decreasing order of their Hessian diagonal (the paper's "act order";
            the block scales stay those of the natural blocks, so the output format does not change).

    Returns:
        ``(packed uint8 [out, in/2], block_scales)``: the encoding ``nvfp4.dequantize`` reads. Deterministic for
        a given device: the same inputs give the same bytes.

    Raises:
        ValueError: shapes that do not fit, or a Hessian that no damping makes positive definite.
    """
    codes = gptq_codes(weight, hessian, weight_scale_2, block_scales, damp, block_size, act_order)
    return nvfp4.pack_nibbles(codes), block_scales


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X Wᵀ - X Ŵᵀ||²`` for the inputs whose ``XᵀX`` is ``hessian``: ``tr(Δ XᵀX Δᵀ)`` with ``Δ = W - Ŵ``,
    without forming ``X``. GPTQ is greedy and its damping moves it off the exact objective, so a caller can check
    its result against round-to-nearest's with this."""
    delta = weight.float() - dequantized.float()
    return float(((delta @ hessian.float()) * delta).sum())
