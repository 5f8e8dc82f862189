#!/usr/bin/env python3
"""End-to-end benchmark on a DeepSeek-V3-shaped bf16 checkpoint with real layer dims.

Measures, on the same files in the same run: the raw sequential read speed of the input (page cache
dropped with posix_fadvise before each cold measurement), modelopt-streaming end to end (wall time,
MB/s of input, peak RSS of the process), and NVIDIA ModelOpt's NVFP4QTensor over a sample of the same
weights. Prints a Markdown table for docs/benchmarks.md.

    python bench/bench_quantize.py --workdir /tmp/msbench            # ~5 GB, 1 GB shards and one 5 GB shard
    python bench/bench_quantize.py --experts 96 --layouts sharded     # ~4x the model size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import synthetic_checkpoint as synth  # noqa: E402

CHILD = """
import json, sys, time
import modelopt_streaming
t = time.perf_counter()
s = modelopt_streaming.quantize(sys.argv[1], sys.argv[2], progress="none", log=lambda *_: None,
                                device=sys.argv[3], mlp_only=sys.argv[4] == "mlp")
wall = time.perf_counter() - t
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"wall": wall, "peak_mb": int(hwm.split()[1]) / 1024, "input_bytes": s.input_bytes,
                  "output_bytes": s.output_bytes, "groups": s.fused_groups}))
"""


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[Path], chunk: int = 64 << 20) -> tuple[float, int]:
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - t, total


def modelopt_sample(src: Path, budget_bytes: int) -> tuple[float, int]:
    """ModelOpt's NVFP4QTensor.quantize (per tensor, as its export calls it) on the first weights."""
    import torch
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from safetensors import safe_open

    done, seconds = 0, 0.0
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                if not k.endswith("proj.weight") or done >= budget_bytes:
                    continue
                w = sf.get_tensor(k)
                t = time.perf_counter()
                NVFP4QTensor.quantize(w, 16)
                seconds += time.perf_counter() - t
                done += w.numel() * w.element_size()
                del w
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return seconds, done


def run_tool(src: Path, out: Path, device: str, scope: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(out), device, scope], capture_output=True, text=True, check=True
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/msbench")
    ap.add_argument("--experts", type=int, default=24, help="routed experts in the MoE layer (24: ~5 GB)")
    ap.add_argument("--layouts", default="sharded,single", help="sharded (1 GB shards), single (one shard)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scope", default="all", choices=["all", "mlp"])
    ap.add_argument("--modelopt_gb", type=float, default=1.0, help="bytes of weights to time ModelOpt on")
    args = ap.parse_args()

    work = Path(args.workdir)
    rows = []
    for layout in args.layouts.split(","):
        shape = synth.DeepseekShape(n_routed_experts=args.experts)
        src = work / f"ds-{args.experts}e-{layout}"
        if not (src / "config.json").exists():
            shutil.rmtree(src, ignore_errors=True)
            synth.write(src, shape, shard_size=10**9 if layout == "sharded" else 10**12)
        files = sorted(src.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in files)
        drop_cache(files)
        read_s, read_bytes = raw_read(files)
        drop_cache(files)
        tool = run_tool(src, work / "out", args.device, args.scope)
        rows.append(
            {
                "layout": f"{layout} ({len(files)} x {size / len(files) / 1e9:.2f} GB)",
                "input_gb": size / 1e9,
                "raw_read_mbs": read_bytes / 1e6 / read_s,
                "tool_s": tool["wall"],
                "tool_mbs": tool["input_bytes"] / 1e6 / tool["wall"],
                "peak_rss_mb": tool["peak_mb"],
                "groups": tool["groups"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    mo_s, mo_bytes = modelopt_sample(src, int(args.modelopt_gb * 1e9))
    mo_mbs = mo_bytes / 1e6 / mo_s

    print(
        f"\n{date.today()} | {platform.machine()} | {os.cpu_count()} cores | device {args.device} | "
        f"experts {args.experts} | scope {args.scope}"
    )
    print(f"ModelOpt NVFP4QTensor.quantize on {mo_bytes / 1e9:.2f} GB of the same weights: {mo_mbs:.0f} MB/s\n")
    print("| input | size GB | raw read MB/s (cold) | modelopt-streaming s | MB/s | x ModelOpt | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['input_gb']:.2f} | {r['raw_read_mbs']:.0f} | {r['tool_s']:.1f} | "
            f"{r['tool_mbs']:.0f} | {r['tool_mbs'] / mo_mbs:.1f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
