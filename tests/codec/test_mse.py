"""The mse block-scale search (codec/mse.py): never worse than rtn per block, rtn's bytes where it keeps rtn's
scale, hand-computed blocks where another scale wins, and the error it minimizes is what a consumer decodes."""

import pytest
import torch
from modelopt.torch.quantization.qtensor import NVFP4QTensor

from modelopt_streaming.codec import (
    ALGORITHMS,
    algorithm_settings,
    cpu_kernel,
    cuda_kernel,  # interpreted on the CPU: conftest sets TRITON_INTERPRET
    mse,
    nvfp4,
    select_codec,
)
from modelopt_streaming.formats.nvfp4 import E2M1_VALUES, unpack_e2m1


def _heavy(shape, dtype, seed, df=3):
    """Student-t weights with ``df`` degrees of freedom (heavy tails, as LLM weights; a normal over the root of
    a chi-squared from ``df`` squared normals, so the generator fixes every value) and a few outlier columns."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    v = torch.stack([torch.randn(shape, generator=g) ** 2 for _ in range(df)]).sum(0) / df
    w = z / v.sqrt() * 0.02
    w[:, torch.randint(0, shape[1], (max(1, shape[1] // 64),), generator=g)] *= 10
    return w.to(dtype)


def _modelopt_decode(packed, scales, weight_scale_2, shape):
    """ModelOpt's own dequantize (NVFP4QTensor), independent of our decode."""
    q = NVFP4QTensor(torch.Size(shape), torch.float32, packed)
    return q.dequantize(dtype=torch.float32, scale=scales, double_scale=weight_scale_2, block_sizes={-1: 16})


def _block_error(weight, decoded):
    """Per-block squared error in float32, the 16 terms added pairwise in order (the test's own copy)."""
    d = weight.float().reshape(weight.shape[0], -1, 16) - decoded.reshape(weight.shape[0], -1, 16)
    s = d * d
    while s.shape[-1] > 1:
        s = s[..., 0::2] + s[..., 1::2]
    return s[..., 0]


def _block_error64(weight, decoded):
    d = weight.double().reshape(weight.shape[0], -1, 16) - decoded.double().reshape(weight.shape[0], -1, 16)
    return (d * d).sum(-1)


SHAPES = [(64, 256), (33, 128), (128, 2048), (1, 16)]
# Multiples of the weight's own amax / 2688: 1 is a lone weight; larger ones are fused-group members whose
# partner holds the group's largest value (their block scales then sit lower on the E4M3 grid, 2000 deep in
# its subnormal range).
GS_MULTIPLES = [1.0, 3.0, 50.0, 2000.0]


@pytest.mark.parametrize("gs_multiple", GS_MULTIPLES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_never_worse_than_rtn_per_block(shape, dtype, gs_multiple):
    w = _heavy(shape, dtype, seed=shape[0] * 7 + shape[1])
    ws2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w)) * gs_multiple
    rtn_packed, rtn_scales = nvfp4.quantize(w, ws2)
    packed, scales, errors = mse.quantize_with_error(w, ws2)
    assert packed.shape == rtn_packed.shape and packed.dtype == torch.uint8
    assert scales.shape == rtn_scales.shape and scales.dtype == torch.float8_e4m3fn
    e_rtn = _block_error(w, _modelopt_decode(rtn_packed, rtn_scales, ws2, shape))
    e_mse = _block_error(w, _modelopt_decode(packed, scales, ws2, shape))
    # (c) what the search minimized is what ModelOpt's decode gives back, bit for bit.
    assert torch.equal(errors, e_mse)
    assert (e_mse <= e_rtn).all()
    # In float64 too (the float32 comparison decided; a near tie may differ in the last bits only).
    e64_rtn = _block_error64(w, _modelopt_decode(rtn_packed, rtn_scales, ws2, shape))
    e64_mse = _block_error64(w, _modelopt_decode(packed, scales, ws2, shape))
    assert (e64_mse <= e64_rtn * (1 + 1e-6)).all()
    changed = scales.view(torch.uint8) != rtn_scales.view(torch.uint8)
    # A changed scale was chosen by a strictly smaller error; an unchanged one keeps rtn's bytes exactly.
    assert (e_mse[changed] < e_rtn[changed]).all()
    same_blocks = ~changed
    p, rp = packed.reshape(shape[0], -1, 8), rtn_packed.reshape(shape[0], -1, 8)
    assert torch.equal(p[same_blocks], rp[same_blocks])
    if w.numel() >= 4096:
        assert changed.float().mean() > 0.25, "the search should improve a good share of heavy-tailed blocks"
        assert e_mse.double().sum() < 0.95 * e_rtn.double().sum()


def test_hand_computed_blocks():
    """weight_scale_2 = 1, so a block's divisor is its E4M3 scale itself, and every value below is exact.

    Row 0: [6, 2.75, -2.75, 2.75, ..., -2.75, 2.75]. rtn: amax 6 / (6 * 1) = 1.0 (E4M3 0x38); 6 -> 6 exact,
    2.75 -> 3 (above the 2.5 threshold), error 15 * 0.25^2 = 0.9375.
    The E4M3 value below 1.0 is 0.9375 (0x37: exponent field 6, mantissa 7: 2^-1 * 1.875):
      6 / 0.9375 = 6.4 -> code 7 (6) -> 5.625, error 0.375^2 = 0.140625;
      2.75 / 0.9375 = 2.9333 -> code 5 (3) -> 2.8125, error 0.0625^2 = 0.00390625, 15 of them 0.05859375;
      total 0.19921875 < 0.9375. The other candidates: 1.125 -> 4.3125, 0.875 -> 0.796875, 1.25 -> 1.9375,
      1.375 -> 0.25 (2.75 / 1.375 = 2 exact, 6 -> 5.5), 1.5 -> 0.9375, 1.625 -> 1.7148, 1.75 -> 0.796875.
      So 0x37 wins. Codes: 6 -> 7, 2.75 -> 5, -2.75 -> 8 | 5 = 0xD; byte 0 = 7 | 5 << 4 = 0x57, bytes 1-7 =
      0xD | 5 << 4 = 0x5D.
    Row 1: [6, 4.5 x 15]. rtn: scale 1.0, 4.5 -> 4 (not above 5), error 15 * 0.25 = 3.75. At 1.5 (0x3C: exponent
      field 7, mantissa 4), four codes above: 6 / 1.5 = 4 and 4.5 / 1.5 = 3, both exact: error 0, which no
      later candidate can beat strictly. Codes: 4 -> 6, 3 -> 5; byte 0 = 6 | 5 << 4 = 0x56, bytes 1-7 = 0x55.
    """
    row0 = [6.0] + [2.75, -2.75] * 7 + [2.75]
    row1 = [6.0] + [4.5] * 15
    w = torch.tensor([row0, row1], dtype=torch.float32)
    ws2 = torch.tensor(1.0)
    rtn_packed, rtn_scales = nvfp4.quantize(w, ws2)
    assert rtn_scales.view(torch.uint8).tolist() == [[0x38], [0x38]]
    packed, scales, errors = mse.quantize_with_error(w, ws2)
    assert scales.view(torch.uint8).tolist() == [[0x37], [0x3C]]
    assert scales.float().tolist() == [[0.9375], [1.5]]
    assert packed.tolist() == [[0x57] + [0x5D] * 7, [0x56] + [0x55] * 7]
    assert errors.tolist() == [[0.19921875], [0.0]]
    assert _block_error(w, nvfp4.dequantize(rtn_packed, rtn_scales, ws2)).tolist() == [[0.9375], [3.75]]
    # Nothing but rtn's scale in the search: rtn's bytes.
    p0, s0 = mse.quantize(w, ws2, below=0, above=0)
    assert torch.equal(p0, rtn_packed) and torch.equal(s0.view(torch.uint8), rtn_scales.view(torch.uint8))


def test_a_tie_keeps_rtns_bytes():
    """A block already on the E2M1 grid at rtn's scale has error 0: no candidate is strictly better."""
    grid = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32)
    w = torch.stack([grid, grid * 0.5, grid.flip(0)])
    ws2 = torch.tensor(1.0)
    packed, scales, errors = mse.quantize_with_error(w, ws2)
    rtn_packed, rtn_scales = nvfp4.quantize(w, ws2)
    assert (errors == 0).all()
    assert torch.equal(packed, rtn_packed) and torch.equal(scales.view(torch.uint8), rtn_scales.view(torch.uint8))


def test_edge_blocks_keep_rtns_bytes():
    """All-zero blocks keep rtn's scale 1.0; NaN blocks (--allow_nonfinite) and blocks holding an infinity keep
    rtn's bytes; scales clamped to E4M3's range never step outside it."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 64, generator=g)
    w[0] = 0.0
    w[1, :16] = -0.0
    w[2, 3] = float("nan")
    w[3, 20] = float("inf")
    w[4, 40] = -float("inf")
    ws2 = nvfp4.weight_scale_2_from_amax(torch.tensor(4.0))
    packed, scales = mse.quantize(w, ws2)
    rtn_packed, rtn_scales = nvfp4.quantize(w, ws2)
    bits, rtn_bits = scales.view(torch.uint8), rtn_scales.view(torch.uint8)
    for row, block in [(0, 0), (0, 3), (1, 0), (2, 0), (3, 1), (4, 2)]:
        assert bits[row, block] == rtn_bits[row, block], (row, block)
        assert torch.equal(packed[row, block * 8 : block * 8 + 8], rtn_packed[row, block * 8 : block * 8 + 8])
    assert bits[0].tolist() == [0x38] * 4 and rtn_bits[2, 0] == 0x7F
    # The clamps: a global scale far too small puts every block at 448 (0x7E: nothing above it); one far too
    # large at 2^-9 (0x01: nothing below it).
    for ws2, edge in [(torch.tensor(1e-8), 0x7E), (torch.tensor(1e6), 0x01)]:
        p, s, e = mse.quantize_with_error(w[5:], ws2)
        rp, rs = nvfp4.quantize(w[5:], ws2)
        assert (rs.view(torch.uint8) == edge).all()
        b = s.view(torch.uint8)
        assert ((b >= 0x01) & (b <= 0x7E)).all()
        assert (e <= _block_error(w[5:], nvfp4.dequantize(rp, rs, ws2))).all()


def test_chunked_rows_equal_one_pass(monkeypatch):
    w = _heavy((300, 64), torch.bfloat16, seed=5)
    ws2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w))
    whole = mse.quantize(w, ws2)
    monkeypatch.setattr(mse, "_ROWS_PER_CHUNK_ELEMS", 64 * 7)
    chunked = mse.quantize(w, ws2)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1].view(torch.uint8), chunked[1].view(torch.uint8))


def test_fused_experts_take_the_mse_codec():
    w = _heavy((3 * 64, 48), torch.bfloat16, seed=9).reshape(3, 64, 48)
    ws2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w))
    packed, scales = nvfp4.quantize_experts(w, ws2, mse.quantize)
    assert packed.shape == (3, 32, 48) and scales.shape == (3, 4, 48)
    for e in range(3):
        p, s = mse.quantize(w[e].t().contiguous(), ws2)
        assert torch.equal(packed[e], p.t()) and torch.equal(scales[e].view(torch.uint8), s.view(torch.uint8).t())


def test_candidate_order_and_settings():
    assert mse.candidate_offsets(2, 6) == (0, -1, 1, -2, 2, 3, 4, 5, 6)
    assert mse.candidate_offsets(0, 0) == (0,)
    with pytest.raises(ValueError):
        mse.candidate_offsets(-1, 0)
    assert ALGORITHMS == ("rtn", "mse")
    assert algorithm_settings("rtn") == {}
    assert algorithm_settings("mse") == {
        "scales_below": mse.DEFAULT_BELOW,
        "scales_above": mse.DEFAULT_ABOVE,
        "global_scale_search": False,
    }
    codec = select_codec(torch.device("cpu"), "mse")
    assert codec.quantize is (cpu_kernel.quantize_mse if cpu_kernel.mse_available() else mse.quantize)
    assert "mse" in codec.name
    # rtn keeps its kernels.
    rtn = cpu_kernel.quantize if cpu_kernel.available() else nvfp4.quantize
    assert select_codec(torch.device("cpu")).quantize is rtn
    with pytest.raises(ValueError):
        select_codec(torch.device("cpu"), "gptq-not-here")


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        mse.quantize(torch.zeros(4, 24), torch.tensor(1.0))
    with pytest.raises(ValueError):
        mse.quantize(torch.zeros(2, 4, 16), torch.tensor(1.0))


def test_decoded_values_lie_on_the_grid():
    w = _heavy((32, 128), torch.float32, seed=11)
    ws2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w))
    packed, scales = mse.quantize(w, ws2)
    values = unpack_e2m1(packed).reshape(32, -1, 16)
    divisor = (scales.float() * ws2).unsqueeze(-1)
    assert torch.equal((values * divisor).reshape(32, 128), nvfp4.dequantize(packed, scales, ws2))


def _triton_cases():
    g = torch.Generator().manual_seed(21)
    out = []
    for shape, dtype, mult in [
        ((16, 128), torch.bfloat16, 1.0),
        ((33, 272), torch.float32, 3.0),
        ((8, 64), torch.float16, 2000.0),
        ((3, 16), torch.bfloat16, 50.0),
    ]:
        w = _heavy(shape, dtype, seed=int(torch.randint(0, 1000, (1,), generator=g)))
        out.append((f"{shape}-{dtype}-x{mult:g}", w, nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w)) * mult))
    w = _heavy((8, 64), torch.float32, seed=4)
    w[0] = 0.0
    w[1, :16] = -0.0
    w[2, 3] = float("nan")
    w[3, 20] = float("inf")
    w[4, 40] = -float("inf")
    out.append(("zero-nan-inf", w, nvfp4.weight_scale_2_from_amax(torch.tensor(0.1))))
    out.append(("clamp-448", w[5:], torch.tensor(1e-8)))
    out.append(("clamp-2^-9", w[5:], torch.tensor(1e6)))
    hand = torch.tensor([[6.0] + [2.75, -2.75] * 7 + [2.75], [6.0] + [4.5] * 15])
    out.append(("hand", hand, torch.tensor(1.0)))
    return out


def _fused_cpu_mse(w, ws2, *args):
    assert cpu_kernel.mse_available(), "the fused CPU kernel was not built with the mse search"
    return cpu_kernel.quantize_mse(w, ws2, *args)


KERNELS = {"fused_cpu": _fused_cpu_mse, "triton_interpreted": cuda_kernel.quantize_mse}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("name,weight,ws2", _triton_cases(), ids=[c[0] for c in _triton_cases()])
def test_kernels_equal_the_torch_search(name, weight, ws2, kernel):
    """The C kernel, and the CUDA kernel's arithmetic run by Triton's interpreter on the CPU (the compiled kernel
    on a GPU: bench/gpu_mse.py), give the torch search's bytes."""
    expected = mse.quantize(weight, ws2)
    got = KERNELS[kernel](weight, ws2)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1].view(torch.uint8), expected[1].view(torch.uint8))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("below,above", [(0, 0), (1, 0), (0, 3), (3, 1)])
def test_kernel_candidate_sets(below, above, kernel):
    w = _heavy((16, 64), torch.bfloat16, seed=below * 10 + above)
    ws2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w))
    expected = mse.quantize(w, ws2, below, above)
    got = KERNELS[kernel](w, ws2, below, above)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1].view(torch.uint8), expected[1].view(torch.uint8))


def test_fused_cpu_kernel_on_large_heavy_tailed_weights():
    """Rows wider than the C kernel's 4096-column chunk, and many rows over the thread pool."""
    for shape, mult in [((300, 4096 + 48), 1.0), ((64, 8192), 7.0)]:
        w = _heavy(shape, torch.bfloat16, seed=shape[1])
        ws2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w)) * mult
        expected = mse.quantize(w, ws2)
        got = _fused_cpu_mse(w, ws2)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1].view(torch.uint8), expected[1].view(torch.uint8))


def test_cuda_takes_the_triton_search(monkeypatch):
    """The compiled kernel's bytes equal the CPU's on an H100 (bench/gpu_mse.py): CUDA runs it for mse."""
    monkeypatch.setattr(cuda_kernel, "available", lambda: True)
    assert select_codec(torch.device("cuda"), "mse").quantize is cuda_kernel.quantize_mse
    assert select_codec(torch.device("cuda")).quantize is cuda_kernel.quantize
