"""The codec against NVIDIA ModelOpt's own NVFP4QTensor, and against hand-computed FP4 grid cases."""

import pytest
import torch
from modelopt.torch.quantization.qtensor import NVFP4QTensor

from modelopt_streaming.codec import (
    cpu_kernel,
    cuda_kernel,  # interpreted on the CPU: conftest sets TRITON_INTERPRET
    nvfp4,
)
from modelopt_streaming.formats.nvfp4 import E2M1_VALUES, unpack_e2m1


def _cases():
    g = torch.Generator().manual_seed(1234)

    def heavy(shape, df_scale=1.0):
        return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * df_scale)

    cases = []
    shapes = [(16, 16), (32, 48), (64, 64), (128, 256), (256, 512), (512, 1024), (2048, 7168), (7, 32), (1, 16)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    for _i, shape in enumerate(shapes):
        for dtype in dtypes:
            if shape == (2048, 7168) and dtype != torch.bfloat16:
                continue
            cases.append((f"heavy{shape}-{dtype}", heavy(shape, 1.5).to(dtype)))
    w = heavy((64, 128)).to(torch.bfloat16)
    w[3] = 0
    w[5, 16:32] = 0
    cases.append(("zero-blocks", w))
    cases.append(("tiny-magnitudes", (heavy((64, 64)) * 1e-6).to(torch.bfloat16)))
    cases.append(("huge-magnitudes", (heavy((64, 64)) * 1e4).to(torch.float32)))
    cases.append(("fp16-subnormal", (heavy((32, 64)) * 1e-5).to(torch.float16)))
    w = heavy((64, 64)).to(torch.bfloat16)
    w[0, :16] = -0.0
    w[1, 1] = -0.0
    cases.append(("negative-zero", w))
    # Exact E2M1 ties: with amax 6*448 the global scale is ~1, and a block max of 6 gives block scale 1,
    # so the scaled values are the literal tie points.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0])
    w = ties.repeat(8, 1)
    w[0, 7] = 6 * 448
    cases.append(("e2m1-ties", w.to(torch.float32)))
    cases.append(("one-outlier", torch.cat([heavy((16, 64)) * 1e-3, torch.full((1, 64), 300.0)]).to(torch.bfloat16)))
    cases.append(("constant", torch.full((32, 32), 0.125, dtype=torch.bfloat16)))
    return cases


CASES = _cases()


def _fused_cpu(weight, scale_math):
    assert cpu_kernel.available(), "the fused CPU kernel was not built (no C compiler at install?)"
    scale_2 = nvfp4.weight_scale_2_from_amax(cpu_kernel.tensor_amax(weight), scale_math)
    return (*cpu_kernel.quantize(weight, scale_2), scale_2)


def _triton_interpreted(weight, scale_math):
    """The CUDA kernel's arithmetic, run by Triton's interpreter on the CPU (the GPU run is in bench/)."""
    scale_2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(weight), scale_math)
    return (*cuda_kernel.quantize(weight, scale_2), scale_2)


CODECS = {"reference": nvfp4.quantize_tensor, "fused_cpu": _fused_cpu, "triton_interpreted": _triton_interpreted}


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("name,weight", CASES, ids=[c[0] for c in CASES])
def test_bytes_match_modelopt(name, weight, codec):
    if codec == "triton_interpreted" and weight.numel() > 1 << 20:
        weight = weight[:64]  # the interpreter runs at numpy speed; the big shapes run on the GPU in bench/
    ref_q, ref_scale, ref_scale_2 = NVFP4QTensor.quantize(weight.clone(), 16)
    packed, scale, scale_2 = CODECS[codec](weight, "cpu")
    assert scale_2.dtype == torch.float32 and scale_2.shape == ()
    assert torch.equal(scale_2, ref_scale_2)
    assert scale.dtype == torch.float8_e4m3fn
    assert torch.equal(scale.view(torch.uint8), ref_scale.view(torch.uint8))
    assert packed.dtype == torch.uint8 and packed.shape == (weight.shape[0], weight.shape[1] // 2)
    assert torch.equal(packed, ref_q._quantized_data)


@pytest.mark.parametrize("name,weight", CASES[::4], ids=[c[0] for c in CASES[::4]])
def test_shared_global_scale_matches_modelopt(name, weight):
    """A fused member quantized against a larger group amax, as ModelOpt does after fusing."""
    group_scale_2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(weight) * 3, "cpu")
    ref_q, ref_scale, _ = NVFP4QTensor.quantize(weight.clone(), 16, weights_scaling_factor_2=group_scale_2)
    packed, scale = nvfp4.quantize(weight, group_scale_2)
    assert torch.equal(scale.view(torch.uint8), ref_scale.view(torch.uint8))
    assert torch.equal(packed, ref_q._quantized_data)


def test_cuda_scale_math_is_reciprocal_multiply():
    """The two forms, written out here independently, and the spec's "about a fifth differ" fact; that
    ModelOpt on a CUDA tensor gives the cuda form is checked on the GPU by bench/gpu_codec.py (recorded in
    docs/benchmarks.md), and our bytes for it against NVFP4QTensor below. amax > 0: zero has its own rule."""
    amax = torch.rand(10000, dtype=torch.float32, generator=torch.Generator().manual_seed(7)) * 100 + 2.0**-10
    inv = torch.tensor(1 / 2688, dtype=torch.float32)
    cuda_form = torch.stack([nvfp4.weight_scale_2_from_amax(a, "cuda") for a in amax])
    cpu_form = torch.stack([nvfp4.weight_scale_2_from_amax(a, "cpu") for a in amax])
    assert torch.equal(cuda_form, amax * inv)
    assert torch.equal(cpu_form, amax / 2688.0)
    differ = (cuda_form != cpu_form).float().mean().item()
    assert 0.05 < differ < 0.5  # the spec's "about a fifth" differ in the last bit


def test_e2m1_codes_hand_computed():
    q = torch.tensor(
        [
            0.0,
            -0.0,
            0.1,
            -0.1,
            0.25,
            0.26,
            0.75,
            0.74,
            1.25,
            1.26,
            1.75,
            2.5,
            2.6,
            3.5,
            3.4,
            5.0,
            5.01,
            6.0,
            100.0,
            float("inf"),
            float("-inf"),
            float("nan"),
            -6.0,
            -2.5,
        ]
    )
    expected = [0, 0, 0, 8, 0, 1, 2, 1, 2, 3, 4, 4, 5, 6, 5, 6, 7, 7, 7, 7, 15, 7, 15, 12]
    assert nvfp4.e2m1_codes(q).tolist() == expected


def test_packing_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert nvfp4.pack_nibbles(codes).tolist() == [[0x21, 0x0F]]


def test_unpack_e2m1_every_byte():
    """Spec section 1.5-1.6, written out by hand: codes 0-7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6, bit 3 the sign,
    the first element in the low nibble."""
    magnitude = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    value = [magnitude[c & 7] * (-1.0 if c & 8 else 1.0) for c in range(16)]
    packed = torch.arange(256, dtype=torch.uint8).reshape(4, 2, 32)
    got = unpack_e2m1(packed)
    assert got.dtype == torch.float32 and got.shape == (4, 2, 64)
    expected = [[value[b & 15], value[b >> 4]] for b in range(256)]
    assert got.reshape(-1, 2).tolist() == expected
    assert torch.equal(got[..., 1::2].reshape(-1).signbit(), torch.tensor([b >= 128 for b in range(256)]))


def test_dequantize_round_trip_error_is_small():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g)
    packed, scale, scale_2 = nvfp4.quantize_tensor(w)
    back = nvfp4.dequantize(packed, scale, scale_2)
    rel = ((back - w).norm() / w.norm()).item()
    assert 0.0 < rel < 0.15
    # Dequantized values lie exactly on the grid times the block scale.
    grid = torch.tensor(E2M1_VALUES)
    ratio = (back.abs().reshape(256, -1, 16) / (scale.float() * scale_2).unsqueeze(-1)).reshape(-1)
    nearest = (ratio.unsqueeze(-1) - grid).abs().min(-1).values
    assert (nearest <= 1e-5 * grid.max()).all()


def test_chunked_rows_equal_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    s2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w))
    whole = nvfp4.quantize(w, s2)
    monkeypatch.setattr(nvfp4, "_ROWS_PER_CHUNK_ELEMS", 7 * 64)
    chunked = nvfp4.quantize(w, s2)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1].view(torch.uint8), chunked[1].view(torch.uint8))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(torch.ones(4, 24), torch.tensor(1.0))
    with pytest.raises(ValueError, match="2-D"):
        nvfp4.quantize(torch.ones(2, 4, 16), torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_cpu_amax_and_nonfinite(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(300, 64, generator=g) * 7).to(dtype)
    assert torch.equal(cpu_kernel.tensor_amax(w), nvfp4.tensor_amax(w))
    w[5, 5] = float("inf")
    assert cpu_kernel.tensor_amax(w).item() == float("inf")
    w[7, 7] = float("nan")
    assert torch.isnan(cpu_kernel.tensor_amax(w))
    # With non-finite values allowed, the bytes still follow the reference codec.
    s2 = torch.tensor(0.01)
    for impl in (cpu_kernel.quantize, cuda_kernel.quantize):
        packed, scale = impl(w[:16], s2)
        ref_packed, ref_scale = nvfp4.quantize(w[:16], s2)
        assert torch.equal(packed, ref_packed) and torch.equal(scale.view(torch.uint8), ref_scale.view(torch.uint8))


def test_every_e4m3_rounding_boundary():
    """Block scales at every E4M3 value and every midpoint between neighbours (the ties), and just
    beside them: all three codecs round exactly as torch's float8 cast."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[:-1] + codes[1:]) / 2
    targets = torch.cat(
        [codes, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9))]
    )
    targets = targets[(targets >= 2**-9) & (targets <= 448)]
    # One block per target: its amax is target * 6 * ws2 with ws2 = 1, so the block scale is the target.
    w = torch.zeros(len(targets), 16)
    w[:, 0] = targets * 6
    w[:, 1] = -targets  # a second, smaller value exercises the E2M1 grid too
    s2 = torch.tensor(1.0)
    ref_packed, ref_scale = nvfp4.quantize(w, s2)
    assert torch.equal(
        ref_scale.view(torch.uint8), (w[:, 0] / 6).to(torch.float8_e4m3fn).view(torch.uint8).unsqueeze(1)
    )
    for impl in (cpu_kernel.quantize, cuda_kernel.quantize):
        packed, scale = impl(w, s2)
        assert torch.equal(scale.view(torch.uint8), ref_scale.view(torch.uint8))
        assert torch.equal(packed, ref_packed)


def test_c_kernel_e4m3_table_is_torchs():
    """The C kernel's E4M3 values are a constant table fixed at compile time (no lazily filled global that
    threads could race on); every entry must be torch's own float8_e4m3fn value of that bit pattern."""
    assert cpu_kernel.available()
    expected = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    table = cpu_kernel.e4m3_table()
    assert torch.isnan(table[127]) and torch.isnan(expected[127])
    assert torch.equal(table[:127], expected[:127])


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("name,weight", CASES, ids=[c[0] for c in CASES])
def test_default_cuda_scale_math_bytes_match_modelopt(name, weight, codec):
    """The default ``--scale_math cuda``: ModelOpt's NVFP4QTensor, handed the global scale a CUDA run
    computes (amax times the float32 reciprocal of 2688, built here independently of our codec), gives
    our bytes on every codec path. CI has no GPU, so the CUDA form of the scale is fed in."""
    if codec == "triton_interpreted" and weight.numel() > 1 << 20:
        weight = weight[:64]
    amax = weight.float().abs().max()
    cuda_scale_2 = amax * torch.tensor(1 / 2688, dtype=torch.float32)
    ref_q, ref_scale, ref_scale_2 = NVFP4QTensor.quantize(weight.clone(), 16, weights_scaling_factor_2=cuda_scale_2)
    packed, scale, scale_2 = CODECS[codec](weight, "cuda")
    assert torch.equal(scale_2, cuda_scale_2) and torch.equal(ref_scale_2, cuda_scale_2)
    assert torch.equal(scale.view(torch.uint8), ref_scale.view(torch.uint8))
    assert torch.equal(packed, ref_q._quantized_data)


def test_cuda_scale_math_cases_include_a_different_global_scale():
    """The CUDA-form check above is not the CPU-form check again: some cases' global scales differ."""
    inv = torch.tensor(1 / 2688, dtype=torch.float32)
    differ = [n for n, w in CASES if not torch.equal(w.float().abs().max() * inv, w.float().abs().max() / 2688.0)]
    assert len(differ) >= 3, differ
