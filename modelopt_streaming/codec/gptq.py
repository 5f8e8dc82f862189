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
    "e2m1_bounds",
    "e2m1_codes_fast",
    "gptq_codes",
    "gptq_codes_many",
    "gptq_quantize",
    "gptq_quantize_many",
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
# Boundaries between consecutive E2M1 magnitudes for ``torch.bucketize`` (which counts boundaries < |q|); see
# ``e2m1_codes_fast``.
_BOUNDS = (
    0.25,
    float(torch.nextafter(torch.tensor(0.75), torch.tensor(0.0))),
    1.25,
    float(torch.nextafter(torch.tensor(1.75), torch.tensor(0.0))),
    2.5,
    float(torch.nextafter(torch.tensor(3.5), torch.tensor(0.0))),
    5.0,
)


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


def e2m1_codes_fast(q: torch.Tensor, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """``nvfp4.e2m1_codes`` in a few kernels: GPTQ calls it once per column, where the launches of the reference's
    fourteen comparisons are the cost. A tie rounds up (to the even code) at 0.75, 1.75 and 3.5: there the
    boundary is the float32 just below, so that ``count(boundary < |q|)`` counts ``|q| >= t``; the tests check
    every boundary, its neighbours, zeros of both signs, infinities and NaN against the reference. ``bounds``:
    ``e2m1_bounds(q.device)``, made once by a caller that calls this per column (a copy to the GPU each time)."""
    if bounds is None:
        bounds = e2m1_bounds(q.device)
    code = torch.bucketize(q.abs(), bounds).to(torch.uint8)
    code.masked_fill_(torch.isnan(q), 7)
    return code | ((q < 0).to(torch.uint8) << 3)


def e2m1_bounds(device: torch.device) -> torch.Tensor:
    return torch.tensor(_BOUNDS, dtype=torch.float32, device=device)


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
    return gptq_codes_many(
        weight.unsqueeze(0),
        hessian.unsqueeze(0),
        weight_scale_2.reshape(1),
        block_scales.unsqueeze(0),
        damp,
        block_size,
        act_order,
    )[0]


def gptq_codes_many(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    weight_scale_2: torch.Tensor,
    block_scales: torch.Tensor,
    damp: float = DAMP,
    block_size: int = GPTQ_BLOCK,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ of E weights of one shape at once (experts): [E, out, in] weights, [E, in, in] Hessians, [E] global
    scales, [E, out, in/16] block scales -> codes uint8 [E, out, in].

    The column loop runs once for all E (its launches, not its arithmetic, are the cost of one weight); each
    weight's arithmetic is elementwise there, and its factorization and block products are its own, so every
    weight gets the bytes it gets alone, whatever it is batched with."""
    if weights.dim() != 3:
        raise ValueError(f"expected weights [E, out, in], got shape {tuple(weights.shape)}")
    n_exp, n_out, n_in = weights.shape
    if n_in % BLOCK_SIZE:
        raise ValueError(f"input dim {n_in} is not a multiple of {BLOCK_SIZE}")
    if tuple(hessians.shape) != (n_exp, n_in, n_in):
        raise ValueError(f"Hessian of shape {tuple(hessians.shape[1:])} for a weight of {n_in} inputs")
    if tuple(block_scales.shape) != (n_exp, n_out, n_in // BLOCK_SIZE):
        raise ValueError(f"block scales of shape {tuple(block_scales.shape[1:])} for a weight {(n_out, n_in)}")
    device = weights.device
    w = weights.detach().to(torch.float32, copy=True)
    h = hessians.detach().to(device=device, dtype=torch.float32, copy=True)
    scale_2 = weight_scale_2.to(device=device, dtype=torch.float32).reshape(n_exp, 1, 1)
    # The divisor of every weight, rounded to float32 as nvfp4 rounds it, so that with no error to feed forward
    # (an identity Hessian) the codes are round-to-nearest's, bit for bit.
    divisor = (block_scales.to(device).float() * scale_2).repeat_interleave(BLOCK_SIZE, dim=2)

    # An input that was zero on every calibration token has no curvature: the reference code gives it a unit
    # diagonal (so the factorization exists) and zeroes its weights (their error cannot be seen in the output).
    diagonal = h.diagonal(dim1=1, dim2=2)
    dead = diagonal == 0
    diagonal[dead] = 1
    w.masked_fill_(dead.unsqueeze(1), 0)
    perm = None
    if act_order:
        # Largest diagonal first, stable so that equal diagonals keep their order on every device.
        perm = torch.argsort(diagonal, dim=1, descending=True, stable=True)
        cols = perm.unsqueeze(1).expand(n_exp, n_out, n_in)
        w, divisor = w.gather(2, cols), divisor.gather(2, cols)
        h = h.gather(1, perm.unsqueeze(2).expand(n_exp, n_in, n_in))
        h = h.gather(2, perm.unsqueeze(1).expand(n_exp, n_in, n_in))
    upper = torch.stack([inverse_hessian_factor(h[e], damp) for e in range(n_exp)])
    del h, diagonal

    table = torch.tensor(_SIGNED_E2M1, dtype=torch.float32, device=device)
    bounds = e2m1_bounds(device)
    codes = torch.empty((n_exp, n_out, n_in), dtype=torch.uint8, device=device)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        w1 = w[:, :, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = upper[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, div = w1[:, :, i], divisor[:, :, i1 + i]
            code = e2m1_codes_fast(col / div, bounds)
            codes[:, :, i1 + i] = code
            # The dequantized value exactly as a consumer computes it (nvfp4.dequantize): E2M1 * scale product.
            err = (col - table[code.long()] * div) / u1[:, i, i].unsqueeze(1)
            w1[:, :, i:] -= err.unsqueeze(2) * u1[:, i, i:].unsqueeze(1)
            err1[:, :, i] = err
        # The block's errors reach the later columns in one product per weight (the paper's lazy batch update).
        if i2 < n_in:
            for e in range(n_exp):
                w[e, :, i2:] -= err1[e] @ upper[e, i1:i2, i2:]
    if perm is not None:
        codes = codes.gather(2, torch.argsort(perm, dim=1).unsqueeze(1).expand(n_exp, n_out, n_in))
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


def gptq_quantize_many(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    weight_scale_2: torch.Tensor,
    block_scales: torch.Tensor,
    damp: float = DAMP,
    block_size: int = GPTQ_BLOCK,
    act_order: bool = False,
) -> torch.Tensor:
    """``gptq_quantize`` of E weights of one shape at once (``gptq_codes_many``): packed uint8 [E, out, in/2],
    each equal to what ``gptq_quantize`` gives it alone."""
    return nvfp4.pack_nibbles(
        gptq_codes_many(weights, hessians, weight_scale_2, block_scales, damp, block_size, act_order)
    )
