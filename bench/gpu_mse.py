#!/usr/bin/env python3
"""``--algorithm mse`` on a device: byte identity of the mse codec there against the CPU, and its speed against
rtn's codecs (the Triton kernel and the torch reference) on the same device.

Checks, on heavy-tailed (Student-t) weights of DeepSeek-V3's shapes and the edge cases (zero blocks, NaN and
infinite blocks as --allow_nonfinite writes them, fused-group global scales larger than the tensor's own, tiny
and huge magnitudes, bf16/fp16/fp32):
  - mse on the device gives the CPU's bytes (packed codes and block scales) and the CPU's block errors;
  - no block's error exceeds rtn's;
then times rtn and mse (median of --reps runs, each between two device synchronizations) against the bf16 bytes
they read, and prints one JSON line (also written to $OUT/gpu_mse.json when OUT is set).

    python bench/gpu_mse.py                 # on a CUDA machine
    python bench/gpu_mse.py --device cpu    # small sizes, to check the script itself anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from modelopt_streaming.codec import cuda_kernel, mse, nvfp4  # noqa: E402


def student_t(shape, df: int, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(shape, generator=g)
    v = torch.stack([torch.randn(shape, generator=g) ** 2 for _ in range(df)]).sum(0) / df
    return z / v.sqrt() * 0.02


def cases(small: bool):
    """(name, weight on the CPU, global-scale multiple of its own amax / 2688)."""
    g = torch.Generator().manual_seed(1234)
    big = [] if small else [(2048, 7168), (7168, 2048), (1536, 7168)]
    out = []
    for shape in [(16, 16), (7, 32), (256, 512), (512, 2048), *big]:
        out.append((f"t3{shape}-bf16", student_t(shape, 3, g).to(torch.bfloat16), 1.0))
    for dt in (torch.float16, torch.float32):
        out.append((f"t5(256, 512)-{str(dt)[6:]}", student_t((256, 512), 5, g).to(dt), 1.0))
    for mult in (3.0, 50.0, 2000.0):
        out.append((f"fused-group-gs-x{mult:g}", student_t((256, 1024), 3, g).to(torch.bfloat16), mult))
    w = student_t((64, 128), 3, g)
    w[3] = 0
    w[5, 16:32] = -0.0
    w[7, 40] = float("nan")
    w[9, 70] = float("inf")
    w[11, 100] = -float("inf")
    out.append(("zero-nan-inf-blocks-fp32", w, 1.0))
    out.append(("tiny-bf16", (student_t((64, 64), 3, g) * 1e-6).to(torch.bfloat16), 1.0))
    out.append(("huge-fp32", (student_t((64, 64), 3, g) * 1e6).to(torch.float32), 1.0))
    return out


def block_error(w: torch.Tensor, packed, scales, ws2) -> torch.Tensor:
    d = w.float().reshape(w.shape[0], -1, 16) - nvfp4.dequantize(packed, scales, ws2).reshape(w.shape[0], -1, 16)
    s = d * d
    while s.shape[-1] > 1:
        s = s[..., 0::2] + s[..., 1::2]
    return s[..., 0]


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a.cpu(), b.cpu())


def median_s(fn, device: torch.device, reps: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: Triton compiles, the caching allocator fills
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device(args.device)
    small = dev.type == "cpu"
    report: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "candidates": list(mse.candidate_offsets()),
        "checks": [],
        "timings": [],
    }
    failures = 0
    for name, w, mult in cases(small):
        ws2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w).nan_to_num(nan=1.0, posinf=1.0)) * mult
        cpu_p, cpu_s, cpu_e = mse.quantize_with_error(w, ws2)
        p, s, e = mse.quantize_with_error(w.to(dev), ws2.to(dev))
        triton_equal = None
        if dev.type == "cuda" and cuda_kernel.available():
            tp, ts = cuda_kernel.quantize_mse(w.to(dev), ws2.to(dev))
            triton_equal = equal(tp, cpu_p) and equal(ts, cpu_s)
        rtn_p, rtn_s = nvfp4.quantize(w, ws2)
        e_rtn = block_error(w, rtn_p, rtn_s, ws2)
        finite = torch.isfinite(e_rtn)
        row = {
            "case": name,
            "bytes_equal_cpu": equal(p, cpu_p) and equal(s, cpu_s),
            "triton_bytes_equal_cpu": triton_equal,
            "errors_equal_cpu": torch.equal(e.cpu().nan_to_num(nan=-1.0), cpu_e.nan_to_num(nan=-1.0)),
            "never_worse_than_rtn": bool((cpu_e[finite] <= e_rtn[finite]).all()),
            "blocks_improved": round(float((cpu_e < e_rtn).float().mean()), 3),
            "rel_mse_vs_rtn": round(
                float(cpu_e[finite].double().sum() / e_rtn[finite].double().sum().clamp_min(1e-300)), 4
            ),
        }
        ok = row["bytes_equal_cpu"] and row["errors_equal_cpu"] and row["never_worse_than_rtn"]
        ok = ok and triton_equal in (None, True)
        failures += not ok
        row["ok"] = ok
        report["checks"].append(row)
        print(("ok   " if ok else "FAIL ") + json.dumps(row), file=sys.stderr, flush=True)

    g = torch.Generator().manual_seed(7)
    shapes = [(256, 512), (512, 2048)] if small else [(7168, 2048), (2048, 7168), (18432, 7168)]
    for shape in shapes:
        w = student_t(shape, 3, g).to(torch.bfloat16).to(dev)
        ws2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w)).to(dev)
        gb = w.numel() * 2 / 1e9
        row = {"shape": list(shape), "bf16_GB": round(gb, 4)}
        timed = {
            "rtn_torch": lambda w=w, ws2=ws2: nvfp4.quantize(w, ws2),
            "mse_torch": lambda w=w, ws2=ws2: mse.quantize(w, ws2),
        }
        if dev.type == "cuda" and cuda_kernel.available():
            timed["rtn_triton"] = lambda w=w, ws2=ws2: cuda_kernel.quantize(w, ws2)
            timed["mse_triton"] = lambda w=w, ws2=ws2: cuda_kernel.quantize_mse(w, ws2)
        for key, fn in timed.items():
            row[f"{key}_GBps"] = float(f"{gb / median_s(fn, dev, args.reps):.4g}")
        row["mse_torch_over_rtn_torch"] = round(row["mse_torch_GBps"] / row["rtn_torch_GBps"], 3)
        if "rtn_triton_GBps" in row:
            row["mse_triton_over_rtn_triton"] = round(row["mse_triton_GBps"] / row["rtn_triton_GBps"], 3)
        report["timings"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del w
    report["ok"] = failures == 0
    line = json.dumps(report)
    print(line)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_mse.json").write_text(line + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
