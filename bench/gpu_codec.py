#!/usr/bin/env python3
"""CUDA codec on a lent GPU: byte identity against the CPU reference and timing, in one run.

Checks, on heavy-tailed tensors of the test suite's kinds (shapes up to 18432 x 7168, bf16/fp16/fp32,
zero blocks, E2M1 ties, tiny and huge magnitudes):
  - the fused Triton kernel and the torch reference codec on CUDA give the CPU reference's bytes;
  - `--scale_math cuda` (amax * fp32(1/2688), computed anywhere) equals what ModelOpt's `amax / 2688`
    gives on a CUDA tensor, and, when nvidia-modelopt imports here, NVFP4QTensor.quantize on CUDA itself;
then times the kernels (CUDA events, median) against the bf16 bytes they read.

    python bench/gpu_codec.py            # prints a table; JSON to $OUT/gpu_codec.json when OUT is set
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from modelopt_streaming.codec import cuda_kernel, nvfp4  # noqa: E402


def cases():
    g = torch.Generator().manual_seed(1234)

    def heavy(shape, spread=1.5):
        return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * spread)

    out = []
    for shape in [
        (16, 16),
        (64, 64),
        (7, 32),
        (256, 512),
        (2048, 7168),
        (7168, 2048),
        (18432, 7168),
        (1536, 7168),
        (576, 7168),
        (24576, 1536),
    ]:
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            if shape[0] * shape[1] > 4e6 and dt != torch.bfloat16:
                continue
            out.append((f"{shape}-{str(dt)[6:]}", heavy(shape).to(dt)))
    w = heavy((64, 128)).to(torch.bfloat16)
    w[3] = 0
    w[5, 16:32] = 0
    out.append(("zero-blocks", w))
    out.append(("tiny", (heavy((64, 64)) * 1e-6).to(torch.bfloat16)))
    out.append(("huge", (heavy((64, 64)) * 1e4).to(torch.float32)))
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0])
    t = ties.repeat(8, 1)
    t[0, 7] = 6 * 448
    out.append(("e2m1-ties", t))
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[:-1] + codes[1:]) / 2
    targets = torch.cat(
        [codes, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9))]
    )
    targets = targets[(targets >= 2**-9) & (targets <= 448)]
    e = torch.zeros(len(targets), 16)
    e[:, 0] = targets * 6
    e[:, 1] = -targets
    out.append(("e4m3-boundaries(ws2=1)", e))
    return out


def equal(a, b):
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def main() -> None:
    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": [], "timings": []}
    try:
        from modelopt.torch.quantization.qtensor import NVFP4QTensor
    except Exception as e:  # noqa: BLE001 - reported, the other checks still run
        NVFP4QTensor = None
        report["modelopt"] = f"not importable here: {type(e).__name__}: {e}"
    failures = 0
    for name, w in cases():
        fixed_ws2 = name.startswith("e4m3-boundaries")
        amax = nvfp4.tensor_amax(w)
        ws2 = torch.tensor(1.0) if fixed_ws2 else nvfp4.weight_scale_2_from_amax(amax, "cuda")
        ref_packed, ref_scale = nvfp4.quantize(w, ws2)
        wg = w.to(dev)
        row = {"case": name}
        # ModelOpt's CUDA arithmetic for the global scale: a division by the Python scalar 2688 on a CUDA tensor.
        row["scale_math_cuda_matches_torch_cuda_div"] = bool(
            torch.equal((amax.to(dev) / 2688.0).cpu(), nvfp4.weight_scale_2_from_amax(amax, "cuda"))
        )
        p, s = cuda_kernel.quantize(wg, ws2)
        row["triton_equals_cpu_reference"] = equal(p, ref_packed) and equal(s, ref_scale)
        p, s = nvfp4.quantize(wg, ws2.to(dev))
        row["torch_cuda_equals_cpu_reference"] = equal(p, ref_packed) and equal(s, ref_scale)
        if NVFP4QTensor is not None and not fixed_ws2:
            q, sc, s2 = NVFP4QTensor.quantize(wg.clone(), 16)
            row["modelopt_cuda_scale_2_equals_ours"] = bool(torch.equal(s2.cpu(), ws2))
            row["modelopt_cuda_bytes_equal_ours"] = equal(q._quantized_data, ref_packed) and equal(sc, ref_scale)
        ok = all(v for k, v in row.items() if k != "case")
        failures += not ok
        row["ok"] = ok
        report["checks"].append(row)
        print(("ok   " if ok else "FAIL ") + json.dumps(row), flush=True)

    import triton.testing

    for shape in [(2048, 7168), (7168, 2048), (18432, 7168), (4 * 18432, 7168)]:
        w = (torch.randn(shape, device=dev) * 0.02).to(torch.bfloat16)
        ws2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w).cpu())
        gb = w.numel() * 2 / 1e9
        t_kernel = triton.testing.do_bench(lambda w=w, ws2=ws2: cuda_kernel.quantize(w, ws2), return_mode="median")
        t_amax = triton.testing.do_bench(lambda w=w: nvfp4.tensor_amax(w), return_mode="median")
        t_ref = triton.testing.do_bench(lambda w=w, ws2=ws2: nvfp4.quantize(w, ws2.to(dev)), return_mode="median")
        host = torch.empty(w.numel() * 2, dtype=torch.uint8, pin_memory=True)
        t_h2d = triton.testing.do_bench(
            lambda w=w, host=host: w.view(-1).view(torch.uint8).copy_(host, non_blocking=True), return_mode="median"
        )
        row = {
            "shape": list(shape),
            "bf16_GB": round(gb, 3),
            "triton_quantize_GBps": round(gb / (t_kernel / 1e3), 1),
            "amax_GBps": round(gb / (t_amax / 1e3), 1),
            "triton_quantize_plus_amax_GBps": round(gb / ((t_kernel + t_amax) / 1e3), 1),
            "torch_reference_GBps": round(gb / (t_ref / 1e3), 1),
            "pinned_h2d_GBps": round(gb / (t_h2d / 1e3), 1),
        }
        report["timings"].append(row)
        print(json.dumps(row), flush=True)
        del w
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_codec.json").write_text(json.dumps(report, indent=2))
    print(
        f"\n{report['device']}, torch {report['torch']}: {len(report['checks']) - failures}/{len(report['checks'])} "
        f"byte-identity cases passed; modelopt: {report.get('modelopt', 'imported')}"
    )
    print("| shape | GB bf16 | Triton codec GB/s | + amax GB/s | torch reference GB/s | pinned H2D GB/s |")
    print("|---|---|---|---|---|---|")
    for r in report["timings"]:
        print(
            f"| {r['shape']} | {r['bf16_GB']} | {r['triton_quantize_GBps']} | {r['triton_quantize_plus_amax_GBps']} "
            f"| {r['torch_reference_GBps']} | {r['pinned_h2d_GBps']} |"
        )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
