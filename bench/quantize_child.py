"""One timed quantize run, as a process of its own (or one torchrun rank): prints a JSON line with the
wall time, this process's peak RSS (VmHWM) and the summary's figures."""

import json
import os
import sys
import time
from pathlib import Path

import modelopt_streaming
from modelopt_streaming.runner import init_distributed

src, out, device, scope = sys.argv[1:5]
device, distributed = init_distributed(device)
t = time.perf_counter()
s = modelopt_streaming.quantize(src, out, progress="none", log=lambda *_: None, device=device, mlp_only=scope == "mlp")
wall = time.perf_counter() - t
hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
print(
    json.dumps(
        {
            "rank": int(os.environ.get("RANK", 0)),
            "wall": wall,
            "peak_mb": int(hwm.split()[1]) / 1024,
            "input_bytes": s.input_bytes,
            "output_bytes": s.output_bytes,
            "stages": s.stages,
            "groups": s.fused_groups,
        }
    ),
    flush=True,
)
if distributed:
    import torch.distributed as dist

    dist.destroy_process_group()
