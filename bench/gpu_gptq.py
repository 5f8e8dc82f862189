#!/usr/bin/env python3
"""GPTQ's cost on one device: ``codec.gptq.gptq_quantize`` on DeepSeek-V3's weight shapes and the rate at which
``engine.hessian.HessianSum`` accumulates ``XᵀX``, with round-to-nearest beside it, in one run.

Shapes [out, in]: a routed expert's gate or up (2048 x 7168) and down (7168 x 2048), MLA's q_b_proj (24576 x 1536)
and a dense layer's down_proj (7168 x 18432). Each solve is timed once after a warm-up on a smaller weight (the
solve is a fixed sequence of kernels, so one run is its cost), checked to give the same bytes twice, and its
output error on the inputs it was solved on is reported against round-to-nearest's. From the timings, a
projection of DeepSeek-V3's 58 MoE layers (257 experts x 3 weights each) is printed: a projection, not a run.

    python bench/gpu_gptq.py                 # CUDA when available: full shapes; prints one JSON line
    python bench/gpu_gptq.py --device cpu    # sizes divided by 16 (a check that the script runs)

With OUT set, the JSON also goes to $OUT/gpu_gptq.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from modelopt_streaming.codec import gptq, nvfp4  # noqa: E402
from modelopt_streaming.engine.hessian import HessianSum  # noqa: E402

SHAPES = {
    "expert_gate_up": (2048, 7168),
    "expert_down": (7168, 2048),
    "mla_q_b": (24576, 1536),
    "dense_down": (7168, 18432),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def _inputs(tokens: int, n_in: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Correlated bf16 activations with a few outlier channels (a transformer's kind of input)."""
    rank = min(n_in, 256)
    basis = torch.randn(rank, n_in, generator=g) / rank**0.5
    x = torch.randn(tokens, rank, generator=g) @ basis + 0.3 * torch.randn(tokens, n_in, generator=g)
    x[:, torch.randperm(n_in, generator=g)[: max(1, n_in // 64)]] *= 20
    return x.to(device=device, dtype=torch.bfloat16)


def _weight(shape: tuple[int, int], g: torch.Generator, device: torch.device) -> torch.Tensor:
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 0.8) * 0.02
    return w.to(device=device, dtype=torch.bfloat16)


def _error(x: torch.Tensor, w: torch.Tensor, deq: torch.Tensor) -> float:
    x = x.float()
    return float(torch.linalg.norm(x @ w.float().T - x @ deq.T))


def run_shape(name: str, shape: tuple[int, int], tokens: int, device: torch.device, act_order: bool) -> dict:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # str hash() differs run to run
    w = _weight(shape, g, device)
    x = _inputs(tokens, shape[1], g, device)
    hess = HessianSum()
    batch = max(1, tokens // 8)
    _, accumulate_s = _timed(lambda: [hess.add(x[i : i + batch]) for i in range(0, tokens, batch)], device)
    scale_2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w))
    (packed_rtn, scales), rtn_s = _timed(lambda: nvfp4.quantize(w, scale_2), device)
    (packed, _), gptq_s = _timed(lambda: gptq.gptq_quantize(w, hess.h, scale_2, scales, act_order=act_order), device)
    again, _ = gptq.gptq_quantize(w, hess.h, scale_2, scales, act_order=act_order)
    rtn_err = _error(x, w, nvfp4.dequantize(packed_rtn, scales, scale_2))
    gptq_err = _error(x, w, nvfp4.dequantize(packed, scales, scale_2))
    return {
        "name": name,
        "shape": list(shape),
        "tokens": tokens,
        "gptq_s": round(gptq_s, 4),
        "rtn_s": round(rtn_s, 5),
        "hessian_tokens_per_s": round(tokens / max(accumulate_s, 1e-9)),
        "error_vs_rtn": round(gptq_err / rtn_err, 4),
        "deterministic": bool(torch.equal(packed, again)),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def run_batched(shape: tuple[int, int], n: int, tokens: int, device: torch.device) -> dict:
    """``n`` experts of one shape solved together (``gptq_quantize_many``, what a calibrated run does) against one
    after another, and whether each got the same bytes either way."""
    g = torch.Generator().manual_seed(1)
    ws = torch.stack([_weight(shape, g, device) for _ in range(n)])
    hs = []
    for _ in range(n):
        x = _inputs(tokens, shape[1], g, device).float()
        hs.append(x.T @ x)
    hs = torch.stack(hs)
    s2 = torch.stack([nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w)) for w in ws])
    bs = torch.stack([nvfp4.quantize(w, s)[1] for w, s in zip(ws, s2)])
    many, many_s = _timed(lambda: gptq.gptq_quantize_many(ws, hs, s2, bs), device)
    singles, single_s = _timed(lambda: [gptq.gptq_quantize(ws[e], hs[e], s2[e], bs[e])[0] for e in range(n)], device)
    same = all(torch.equal(many[e], singles[e]) for e in range(n))
    return {
        "shape": list(shape),
        "experts": n,
        "together_s": round(many_s, 4),
        "one_by_one_s": round(single_s, 4),
        "same_bytes": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="calibration tokens per weight (default 8192)")
    parser.add_argument("--act_order", action="store_true")
    parser.add_argument("--scale", type=int, default=None, help="divide every dimension by this (default: 16 on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    scale = args.scale or (1 if device.type == "cuda" else 16)
    tokens = args.tokens or (8192 if device.type == "cuda" else 1024)
    # Warm-up: kernels compiled and caches filled on a small weight, so the first timed shape pays nothing extra.
    run_shape("warmup", (256, 512), 512, device, args.act_order)
    results = []
    for name, (n_out, n_in) in SHAPES.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results.append(run_shape(name, (n_out // scale, n_in // scale), tokens, device, args.act_order))
    batched = run_batched(
        (SHAPES["expert_gate_up"][0] // scale, SHAPES["expert_gate_up"][1] // scale), 8, tokens, device
    )
    by_name = {r["name"]: r for r in results}
    # One weight at a time; a run solves experts together (experts_batched says by how much that is faster).
    per_expert_s = 2 * by_name["expert_gate_up"]["gptq_s"] + by_name["expert_down"]["gptq_s"]
    report = {
        "bench": "gpu_gptq",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "scale": scale,
        "act_order": args.act_order,
        "results": results,
        "experts_batched": batched,
        # 58 MoE layers x (256 routed + 1 shared) experts x (gate, up, down); the sizes of this run.
        "projection_deepseek_v3_expert_solves_s": round(58 * 257 * per_expert_s, 1),
    }
    line = json.dumps(report)
    print(line)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_gptq.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
