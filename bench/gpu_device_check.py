#!/usr/bin/env python3
"""`--device cuda:N` runs every kernel on GPU N: a check for a lent machine with two or more GPUs.

With GPU 0 as the process's current device, it quantizes
  1. single weights placed on the last GPU, through the fused Triton kernel and the torch reference codec;
  2. a whole synthetic DeepSeek-shaped checkpoint with ``quantize(..., device="cuda:N")``;
and checks that the bytes equal the CPU codec's, and that GPU 0 never held a byte (the caching allocator's
peak on GPU 0 stays 0), while GPU N did the work.

    python bench/gpu_device_check.py       # exit 0 when every check holds; JSON to $OUT when OUT is set
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from modelopt_streaming import quantize  # noqa: E402
from modelopt_streaming.codec import cuda_kernel, nvfp4  # noqa: E402


def tree(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def main() -> int:
    n = torch.cuda.device_count()
    if n < 2:
        print(f"needs two or more GPUs, found {n}")
        return 2
    last = torch.device(f"cuda:{n - 1}")
    torch.cuda.set_device(0)
    torch.cuda.reset_peak_memory_stats(0)
    results: dict = {"gpus": n, "device": str(last), "name": torch.cuda.get_device_name(last), "checks": {}}
    g = torch.Generator().manual_seed(7)
    ok = True
    for shape in [(256, 512), (2048, 7168), (7168, 2048)]:
        w = (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))).to(torch.bfloat16)
        scale_2 = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w), "cuda")
        ref = nvfp4.quantize(w, scale_2)
        for label, fn in (("triton", cuda_kernel.quantize), ("torch", nvfp4.quantize)):
            out = fn(w.to(last), scale_2.to(last))
            same = all(torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8)) for a, b in zip(out, ref))
            on_last = all(t.device == last for t in out)
            results["checks"][f"{label}-{shape}"] = same and on_last
            ok &= same and on_last
    torch.cuda.synchronize(last)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        subprocess.run(
            [
                sys.executable,
                str(Path(__file__).parents[1] / "examples" / "synthetic_checkpoint.py"),
                str(src),
                "--preset",
                "tiny",
                "--shard_size",
                "2MB",
            ],
            check=True,
        )
        quantize(src, tmp / "cpu", device="cpu", progress="none")
        quantize(src, tmp / "gpu", device=str(last), progress="none")
        same = tree(tmp / "cpu") == tree(tmp / "gpu")
        results["checks"]["checkpoint-bytes"] = same
        ok &= same
    peak0 = torch.cuda.max_memory_allocated(0)
    peak_last = torch.cuda.max_memory_allocated(last)
    results.update(peak_bytes_gpu0=peak0, peak_bytes_last=peak_last)
    results["checks"]["gpu0-untouched"] = peak0 == 0
    results["checks"]["last-gpu-used"] = peak_last > 0
    ok &= peak0 == 0 and peak_last > 0
    results["ok"] = ok
    text = json.dumps(results, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_device_check.json").write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
