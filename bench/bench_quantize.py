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
import hashlib
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

sys.path.insert(0, str(Path(__file__).parents[1]))
from modelopt_streaming.sink.writer import file_system_of  # noqa: E402

CHILD = str(Path(__file__).with_name("quantize_child.py"))


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


def read_and_write(paths: list[Path], out_dir: Path, out_bytes: int, chunk: int = 64 << 20) -> float:
    """The least I/O the job needs: read every input byte once and write (and fsync) as many bytes as the
    output has, interleaved as a streaming run does. Returns seconds."""
    total = sum(p.stat().st_size for p in paths)
    ratio = out_bytes / total
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = bytearray(chunk)
    view = memoryview(buf)
    t = time.perf_counter()
    with open(out_dir / "io-baseline.bin", "wb", buffering=0) as out:
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    out.write(view[: int(n * ratio)])
        os.fsync(out.fileno())
    seconds = time.perf_counter() - t
    (out_dir / "io-baseline.bin").unlink()
    return seconds


def _stream_share(args: tuple[list[str], int, int, str, float, int]) -> float:
    """One of N parallel streams: read bytes [lo, hi) of the concatenated input files and write ``ratio`` of
    them to a file of its own (fsynced). Returns the stream's seconds."""
    names, lo, hi, out_path, ratio, chunk = args
    buf = bytearray(chunk)
    view = memoryview(buf)
    t = time.perf_counter()
    pos = 0
    with open(out_path, "wb", buffering=0) as out:
        for name in names:
            size = os.path.getsize(name)
            a, b = max(lo, pos), min(hi, pos + size)
            if a < b:
                with open(name, "rb", buffering=0) as f:
                    f.seek(a - pos)
                    left = b - a
                    while left > 0:
                        n = f.readinto(view[: min(chunk, left)])
                        if not n:
                            break
                        left -= n
                        out.write(view[: int(n * ratio)])
            pos += size
        os.fsync(out.fileno())
    seconds = time.perf_counter() - t
    os.unlink(out_path)
    return seconds


def parallel_read_and_write(paths: list[Path], out_dir: Path, out_bytes: int, streams: int) -> float:
    """The I/O floor for N ranks: N processes, each reading a contiguous 1/N of the input bytes and writing its
    share of the output, at once. Returns the wall seconds until the slowest stream is done."""
    from concurrent.futures import ProcessPoolExecutor

    total = sum(p.stat().st_size for p in paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            [str(p) for p in paths],
            total * i // streams,
            total * (i + 1) // streams,
            str(out_dir / f"stream{i}.bin"),
            out_bytes / total,
            64 << 20,
        )
        for i in range(streams)
    ]
    with ProcessPoolExecutor(streams) as pool:
        t = time.perf_counter()
        list(pool.map(_stream_share, jobs))
        return time.perf_counter() - t


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


def run_tool(src: Path, out: Path, run: str, scope: str, max_shard_size: int = 5 * 10**9) -> dict:
    """``run``: cpu, cuda, or torchrunN (N processes, one GPU each when CUDA is there, round robin when
    there are more ranks than GPUs), with ``:tK`` for K reader and K writer threads per process."""
    shutil.rmtree(out, ignore_errors=True)
    run, _, threads = run.partition(":t")
    threads = threads or "auto"
    if run.startswith("torchrun"):
        n = int(run[len("torchrun") :])
        device = "cuda" if torch_cuda() else "cpu"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(n),
            CHILD,
            str(src),
            str(out),
            device,
            scope,
            threads,
            str(max_shard_size),
        ]
    else:
        cmd = [sys.executable, CHILD, str(src), str(out), run, scope, threads, str(max_shard_size)]
    t = time.perf_counter()
    # The child reports its start-up (launch to main, torchrun's spawning and imports included) against this.
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_T0": repr(time.time())})
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"{run} failed:\n{r.stderr[-3000:]}")
    lines = sorted(
        (json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")), key=lambda x: x["rank"]
    )
    first = lines[0]
    return {
        **first,
        "wall": wall,
        "peak_mb": max(x["peak_mb"] for x in lines),
        "processes": len(lines),
        "ranks": lines,
    }


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def tree_hashes(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(64 << 20):
                    h.update(chunk)
            out[str(p.relative_to(d))] = h.hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workdir",
        default="/tmp/msbench",
        help="input, outputs and baselines live here; /dev/shm/... puts them on RAM-backed storage (tmpfs)",
    )
    ap.add_argument("--experts", type=int, default=24, help="routed experts in the MoE layer (24: ~5 GB)")
    ap.add_argument("--layouts", default="sharded,single", help="sharded (1 GB shards), single (one shard)")
    ap.add_argument(
        "--runs",
        default="cpu",
        help="comma list of cpu, cuda, torchrunN, each with an optional :tK (K reader and K writer threads per "
        "process; default from the CPUs); outputs are compared",
    )
    ap.add_argument(
        "--cache",
        default="cold",
        choices=["cold", "warm"],
        help="drop the input from the page cache before each timed read (cold) or read it once first (warm)",
    )
    ap.add_argument(
        "--streams",
        default="",
        help="comma list of N: also measure N parallel read+write streams (the I/O floor for N ranks)",
    )
    ap.add_argument("--skip_modelopt", action="store_true")
    ap.add_argument("--scope", default="all", choices=["all", "mlp"])
    ap.add_argument("--max_shard_size", type=int, default=5 * 10**9, help="output shard size, bytes")
    ap.add_argument("--modelopt_gb", type=float, default=1.0, help="bytes of weights to time ModelOpt on")
    args = ap.parse_args()

    work = Path(args.workdir)
    rows = []
    for layout in args.layouts.split(","):
        shape = synth.DeepseekShape(n_routed_experts=args.experts)
        src = work / f"ds-{args.experts}e-{layout}"
        if not (src / "config.json").exists():
            shutil.rmtree(src, ignore_errors=True)
            shard_size = 10**9 if layout == "sharded" else 10**12
            synth.write(src, shape, shard_size=shard_size, device="cuda" if torch_cuda() else "cpu")
        files = sorted(src.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in files)
        if args.cache == "cold":
            drop_cache(files)
        read_s, read_bytes = raw_read(files)
        import modelopt_streaming

        planned_out = modelopt_streaming.quantize(
            src, dry_run=True, mlp_only=args.scope == "mlp", max_shard_size=args.max_shard_size
        ).output_bytes
        if args.cache == "cold":
            drop_cache(files)
        rw_s = read_and_write(files, work / "io-baseline", planned_out)
        streams = {}
        for n in [int(x) for x in args.streams.split(",") if x]:
            if args.cache == "cold":
                drop_cache(files)
            streams[n] = size / 1e6 / parallel_read_and_write(files, work / "io-baseline", planned_out, n)
            print(json.dumps({"layout": layout, "streams": n, "read_write_mbs": streams[n]}), flush=True)
        first_digest = None
        for run in args.runs.split(","):
            if args.cache == "cold":
                drop_cache(files)
            out = work / f"out-{run}"
            tool = run_tool(src, out, run, args.scope, args.max_shard_size)
            # One digest of every output file: runs compare by it, within this invocation and across builds.
            tree_digest = hashlib.sha256(json.dumps(sorted(tree_hashes(out).items())).encode()).hexdigest()
            identical = None if first_digest is None else tree_digest == first_digest
            first_digest = first_digest or tree_digest
            shutil.rmtree(out, ignore_errors=True)
            rows.append(
                {
                    "layout": f"{layout} ({len(files)} x {size / len(files) / 1e9:.2f} GB)",
                    "run": run,
                    "input_gb": size / 1e9,
                    "storage": file_system_of(work),
                    "raw_read_mbs": read_bytes / 1e6 / read_s,
                    "read_write_mbs": size / 1e6 / rw_s,
                    "stages": tool.get("stages"),
                    "tool_s": tool["wall"],
                    "tool_mbs": tool["input_bytes"] / 1e6 / tool["wall"],
                    # The quantize() call of the slowest rank: index, plan, streaming, coordination, export.
                    "quantize_s": max(x["wall"] for x in tool["ranks"]),
                    "quantize_mbs": tool["input_bytes"] / 1e6 / max(x["wall"] for x in tool["ranks"]),
                    "peak_rss_mb": tool["peak_mb"],
                    "groups": tool["groups"],
                    "identical_to_first_run": identical,
                    "output_tree_sha256": tree_digest,
                    "parallel_read_write_mbs": streams,
                    "ranks": tool["ranks"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    mo_mbs = None
    if not args.skip_modelopt:
        mo_s, mo_bytes = modelopt_sample(src, int(args.modelopt_gb * 1e9))
        mo_mbs = mo_bytes / 1e6 / mo_s

    print(
        f"\n{date.today()} | {platform.machine()} | {os.cpu_count()} cores | runs {args.runs} | "
        f"experts {args.experts} | scope {args.scope} | output shards <= {args.max_shard_size / 1e9:g} GB | "
        f"cache {args.cache} | storage {file_system_of(work)}"
    )
    if mo_mbs:
        print(f"ModelOpt NVFP4QTensor.quantize on {mo_bytes / 1e9:.2f} GB of the same weights (CPU): {mo_mbs:.0f} MB/s")
    print(
        "\n| input | run | size GB | raw read MB/s | read+write MB/s | process s | MB/s | x raw read "
        "| x read+write | x ModelOpt | quantize s | quantize MB/s | peak RSS MB | same bytes as first run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        xmo = f"{r['tool_mbs'] / mo_mbs:.1f}" if mo_mbs else "-"
        same = {None: "(first)", True: "yes", False: "NO"}[r["identical_to_first_run"]]
        print(
            f"| {r['layout']} | {r['run']} | {r['input_gb']:.2f} | {r['raw_read_mbs']:.0f} | {r['read_write_mbs']:.0f} "
            f"| {r['tool_s']:.1f} | "
            f"{r['tool_mbs']:.0f} | {r['tool_mbs'] / r['raw_read_mbs']:.2f} "
            f"| {r['tool_mbs'] / r['read_write_mbs']:.2f} "
            f"| {xmo} | {r['quantize_s']:.1f} | {r['quantize_mbs']:.0f} | {r['peak_rss_mb']:.0f} "
            f"| {same} |"
        )
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_quantize.json").write_text(json.dumps(rows, indent=2))
    if any(r["parallel_read_write_mbs"] for r in rows):
        print("\nN parallel read+write streams (same files, same run), MB/s of input:")
        for n, mbs in rows[0]["parallel_read_write_mbs"].items():
            print(f"  {n} stream(s): {mbs:.0f}")
    print("\n| run | rank | start-up s | rendezvous s | quantize s | peak RSS MB | busy stages | phases s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for x in r["ranks"]:
            print(
                f"| {r['run']} | {x['rank']} | {x.get('startup_s', 0):.1f} | {x.get('rendezvous_s', 0):.1f} "
                f"| {x['wall']:.1f} | {x['peak_mb']:.0f} | {x['stages']} "
                f"| {', '.join(f'{k} {v:.2f}' for k, v in x.get('phases', {}).items())} |"
            )
    if any(r["identical_to_first_run"] is False for r in rows):
        raise SystemExit("outputs differ between runs")


if __name__ == "__main__":
    main()
