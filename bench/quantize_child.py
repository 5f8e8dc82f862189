"""One timed quantize run, as a process of its own (or one torchrun rank): prints a JSON line with the
wall time, this process's peak RSS (VmHWM) and the summary's figures."""

import time

started = time.time()  # before the heavy imports: start-up counts them

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import modelopt_streaming  # noqa: E402
from modelopt_streaming.jobs.distributed import init_distributed  # noqa: E402

imported = time.time()
src, out, device, scope = sys.argv[1:5]
threads = None if len(sys.argv) < 6 or sys.argv[5] == "auto" else int(sys.argv[5])
max_shard_size = int(sys.argv[6]) if len(sys.argv) > 6 else 5 * 10**9
t = time.perf_counter()
device, distributed = init_distributed(device)
rendezvous = time.perf_counter() - t
t = time.perf_counter()
s = modelopt_streaming.quantize(
    src,
    out,
    progress="none",
    device=device,
    mlp_only=scope == "mlp",
    io_threads=threads,
    max_shard_size=max_shard_size,
)
wall = time.perf_counter() - t
hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
# One write() of one line: a pipe keeps it whole, where print's two writes may interleave with another rank's.
sys.stdout.write(
    json.dumps(
        {
            "rank": int(os.environ.get("RANK", 0)),
            "imports_s": imported - started,
            # From the benchmark's launch to this process's start (torchrun's spawn and Python's start-up).
            "startup_s": started - float(os.environ.get("BENCH_T0", started)),
            "rendezvous_s": rendezvous,
            "wall": wall,
            "peak_mb": int(hwm.split()[1]) / 1024,
            "input_bytes": s.input_bytes,
            "output_bytes": s.output_bytes,
            "stages": s.stages,
            "phases": s.phases,
            "groups": s.fused_groups,
        }
    )
    + "\n"
)
sys.stdout.flush()
if distributed:
    import torch.distributed as dist

    dist.destroy_process_group()
