"""GPTQ in NVFP4 (codec/gptq.py) against an independent GPTQ written here from the paper (Frantar et al. 2022,
Algorithm 1: the upper Cholesky factor of the inverse of the damped Hessian, errors fed forward column by column
and block by block), and against round-to-nearest on the layer's output error."""

from __future__ import annotations

import pytest
import torch

from modelopt_streaming.codec import gptq, nvfp4
from modelopt_streaming.formats.nvfp4 import E2M1_VALUES, unpack_e2m1

_MAGNITUDES = torch.tensor(E2M1_VALUES, dtype=torch.float64)
# Where round-to-nearest between two consecutive magnitudes switches.
_THRESHOLDS = (_MAGNITUDES[1:] + _MAGNITUDES[:-1]) / 2


def _paper_gptq(w, h, divisor, damp=0.01, block=128, act_order=False, dtype=torch.float64):
    """Algorithm 1 of the paper in plain torch, written from the paper, with the NVFP4 grid of fixed scales as
    ``quant``: the nearest of the 8 magnitudes times the weight's scale product (found by distance, not by
    thresholds), with the sign of the value. Returns (codes [out, in] as sign*8 + magnitude index, the value
    ``w / divisor`` each code was chosen from). Runs in ``dtype``; float64 by default, the arithmetic's truth."""
    w = w.to(dtype).clone()
    h = h.to(dtype).clone()
    divisor = divisor.to(dtype)
    n = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.arange(n)
    if act_order:
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h, divisor = w[:, order], h[order][:, order], divisor[:, order]
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=dtype)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h)).T  # upper factor: H^-1 = U^T U
    codes = torch.zeros(w.shape, dtype=torch.long)
    scaled = torch.zeros(w.shape, dtype=dtype)
    mags = _MAGNITUDES.to(dtype)
    for i in range(0, n, block):
        j_end = min(i + block, n)
        err = torch.zeros((w.shape[0], j_end - i), dtype=dtype)
        for j in range(i, j_end):
            s = w[:, j] / divisor[:, j]
            idx = torch.argmin((s.abs().unsqueeze(1) - mags).abs(), dim=1)
            q = torch.where(s < 0, -mags[idx], mags[idx]) * divisor[:, j]
            codes[:, j] = idx + 8 * (s < 0).long()
            scaled[:, j] = s
            err[:, j - i] = (w[:, j] - q) / hinv[j, j]
            w[:, j:j_end] -= err[:, j - i : j - i + 1] * hinv[j, j:j_end].unsqueeze(0)
        w[:, j_end:] -= err @ hinv[i:j_end, j_end:]
    back = torch.argsort(order)
    return codes[:, back], scaled[:, back]


def _heavy(shape, g, spread=1.0):
    return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * spread)


def _correlated_inputs(tokens, n_in, g):
    """Inputs with correlated features and a few outlier channels, as in a transformer's activations."""
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(tokens, n_in, generator=g) @ mix
    x[:, torch.randperm(n_in, generator=g)[: max(1, n_in // 32)]] *= 20
    return x


def _case(n_out=96, n_in=256, tokens=1024, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = _heavy((n_out, n_in), g).to(dtype)
    x = _correlated_inputs(tokens, n_in, g).to(dtype).float()
    h = x.T @ x
    scale_2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w))
    packed, block_scales = nvfp4.quantize(w, scale_2)
    return w, x, h, scale_2, packed, block_scales


def _divisor(block_scales, scale_2):
    return (block_scales.float() * scale_2).repeat_interleave(16, dim=1)


def _codes_of(packed):
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1).long()


def _output_error(x, w, packed, block_scales, scale_2):
    deq = nvfp4.dequantize(packed, block_scales, scale_2)
    return float(torch.linalg.norm(x @ w.float().T - x @ deq.T))


def _near_threshold(scaled, tol):
    """Whether |w / divisor| lies within ``tol`` (relative) of a boundary between two E2M1 magnitudes."""
    s = scaled.abs().unsqueeze(-1)
    return ((s - _THRESHOLDS.to(s.dtype)).abs() <= tol * _THRESHOLDS.to(s.dtype)).any(-1)


# The larger cases are ones where some codes do differ (found by trying seeds), so the explanation is exercised.
@pytest.mark.parametrize(
    "shape,seed,act_order",
    [
        ((96, 256, 1024), 0, False),
        ((96, 256, 1024), 1, True),
        ((256, 1024, 4096), 1, False),
        ((256, 1024, 4096), 0, True),
    ],
)
def test_codes_agree_with_the_papers_algorithm(shape, seed, act_order):
    w, _x, h, scale_2, _p, block_scales = _case(*shape, seed=seed)
    packed, scales_out = gptq.gptq_quantize(w, h, scale_2, block_scales, act_order=act_order)
    assert scales_out is block_scales
    ours = _codes_of(packed)
    ref, scaled = _paper_gptq(w.float(), h, _divisor(block_scales, scale_2), act_order=act_order)
    agree = float((ours == ref).float().mean())
    assert agree >= 0.99, agree
    # The rest is explained: ours runs in float32, the paper's arithmetic here in float64. In every row where a
    # code differs, the first difference (in the order the columns were quantized) is a value that float64 puts
    # within float32 rounding of a boundary between two magnitudes; after it the row's weights carry another
    # error forward, so later codes of that row may differ too.
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(h.shape[0])
    differ = (ours != ref)[:, order]
    if shape[1] == 1024:
        assert differ.any()  # the case is one that tests the explanation
    for row in differ.any(1).nonzero().flatten().tolist():
        first = int(differ[row].nonzero()[0])
        col = int(order[first])
        assert _near_threshold(scaled[row, col], 1e-4), (row, col, float(scaled[row, col]))


def test_float32_paper_algorithm_gives_the_same_codes_mostly():
    """The same algorithm in float32 agrees with ours on at least as many codes as in float64: what differs is
    rounding, not method."""
    w, _x, h, scale_2, _p, block_scales = _case(seed=2)
    ours = _codes_of(gptq.gptq_quantize(w, h, scale_2, block_scales)[0])
    ref32, _ = _paper_gptq(w.float(), h, _divisor(block_scales, scale_2), dtype=torch.float32)
    assert float((ours == ref32).float().mean()) >= 0.99


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape", [(96, 256), (64, 512), (200, 128)])
def test_output_error_below_round_to_nearest(shape, act_order):
    w, x, h, scale_2, rtn_packed, block_scales = _case(*shape, tokens=2048, seed=shape[1])
    packed, _ = gptq.gptq_quantize(w, h, scale_2, block_scales, act_order=act_order)
    rtn = _output_error(x, w, rtn_packed, block_scales, scale_2)
    ours = _output_error(x, w, packed, block_scales, scale_2)
    assert ours < 0.9 * rtn, (ours, rtn)


def test_identity_hessian_is_round_to_nearest():
    for seed, dtype in [(0, torch.bfloat16), (1, torch.float32), (2, torch.float16)]:
        w, _x, _h, scale_2, rtn_packed, block_scales = _case(seed=seed, dtype=dtype)
        for h in (torch.eye(w.shape[1]), 7.5 * torch.eye(w.shape[1])):
            packed, _ = gptq.gptq_quantize(w, h, scale_2, block_scales)
            assert torch.equal(packed, rtn_packed)


def test_dead_inputs_get_zero_codes_and_the_rest_is_quantized():
    w, x, _h, scale_2, _p, block_scales = _case(seed=3)
    x[:, 5] = 0
    x[:, 100:116] = 0
    h = x.T @ x
    codes = _codes_of(gptq.gptq_quantize(w, h, scale_2, block_scales)[0])
    assert (codes[:, 5] == 0).all() and (codes[:, 100:116] == 0).all()
    ref, _ = _paper_gptq(w.float(), h, _divisor(block_scales, scale_2))
    assert float((codes == ref).float().mean()) >= 0.99
    all_dead = gptq.gptq_quantize(w, torch.zeros_like(h), scale_2, block_scales)[0]
    assert (all_dead == 0).all()


def test_deterministic_and_other_blockings_agree():
    w, _x, h, scale_2, _p, block_scales = _case(seed=4)
    a = gptq.gptq_quantize(w, h, scale_2, block_scales)[0]
    assert torch.equal(a, gptq.gptq_quantize(w, h, scale_2, block_scales)[0])
    b = gptq.gptq_quantize(w, h, scale_2, block_scales, block_size=32)[0]
    assert float((_codes_of(a) == _codes_of(b)).float().mean()) >= 0.99


def test_the_output_is_an_nvfp4_encoding_of_the_fixed_scales():
    """Packed as nvfp4 packs, and dequantized through nvfp4.dequantize every value is an E2M1 magnitude times its
    block's fixed scale product."""
    w, _x, h, scale_2, _p, block_scales = _case(seed=5)
    packed, scales = gptq.gptq_quantize(w, h, scale_2, block_scales)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (w.shape[0], w.shape[1] // 2)
    grid = unpack_e2m1(packed)
    assert set(grid.abs().unique().tolist()) <= set(E2M1_VALUES)
    deq = nvfp4.dequantize(packed, scales, scale_2)
    assert torch.equal(deq, grid * _divisor(scales, scale_2))


def test_indefinite_hessian_gets_more_damping_and_bad_shapes_are_refused():
    w, _x, _h, scale_2, _p, block_scales = _case(seed=6)
    h = -torch.eye(w.shape[1]) * 1e-3
    h[0, 0] = 1.0  # mean diagonal tiny against the negative entries: needs more than the default damping
    gptq.gptq_quantize(w, h, scale_2, block_scales)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq.gptq_quantize(w, -torch.eye(w.shape[1]), scale_2, block_scales)
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq.gptq_quantize(w, torch.eye(16), scale_2, block_scales)
    with pytest.raises(ValueError, match="multiple of 16"):
        gptq.gptq_quantize(w[:, :20], torch.eye(20), scale_2, block_scales)


def test_fast_codes_equal_the_reference_codes():
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    near = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(0.0)), torch.nextafter(bounds, torch.tensor(100.0))])
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), -float("inf"), float("nan"), 1e30, 448.0])
    g = torch.Generator().manual_seed(7)
    spread = torch.randn(100_000, generator=g) * torch.exp(torch.randn(100_000, generator=g) * 2)
    q = torch.cat([near, -near, special, spread])
    assert torch.equal(gptq.e2m1_codes_fast(q), nvfp4.e2m1_codes(q))


@pytest.mark.parametrize("act_order", [False, True])
def test_many_weights_at_once_get_the_bytes_each_gets_alone(act_order):
    cases = [_case(64, 128, 512, seed=s) for s in range(3)]
    cases[1][2][7, :] = 0  # a dead input in one of them
    cases[1][2][:, 7] = 0
    ws = torch.stack([c[0] for c in cases])
    hs = torch.stack([c[2] for c in cases])
    s2 = torch.stack([c[3] for c in cases])
    bs = torch.stack([c[5] for c in cases])
    many = gptq.gptq_quantize_many(ws, hs, s2, bs, act_order=act_order)
    for e, (w, _x, h, scale_2, _p, block_scales) in enumerate(cases):
        assert torch.equal(many[e], gptq.gptq_quantize(w, h, scale_2, block_scales, act_order=act_order)[0]), e
