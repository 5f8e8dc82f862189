"""What each stage of the pipeline can move on this machine, one thread and several: sha256, positional reads
into reused, fresh and page-locked buffers, positional writes into fresh files, and host<->GPU copies.

Tells which stage bounds a quantize run before anything in the tool is changed: compare its per-stage
rates (the summary's "read / compute / write" line) with these ceilings.

    python bench/stage_ceilings.py --workdir /dev/shm/msb --threads 1,4,8 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from modelopt_streaming.sink.writer import copy_mapped  # noqa: E402

CHUNK = 16 << 20


def _timed_threads(threads: int, job) -> float:
    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        list(pool.map(job, range(threads)))
        return time.perf_counter() - t


def sha256_rate(nbytes: int, threads: int) -> float:
    data = os.urandom(CHUNK)

    def job(_):
        h = hashlib.sha256()
        for _ in range(nbytes // CHUNK):
            h.update(data)

    return threads * nbytes / _timed_threads(threads, job)


def make_files(work: Path, nbytes: int, count: int) -> list[Path]:
    files = []
    block = os.urandom(CHUNK)
    for i in range(count):
        p = work / f"ceiling-in-{i}.bin"
        if not p.exists() or p.stat().st_size != nbytes:
            with open(p, "wb") as f:
                for _ in range(nbytes // CHUNK):
                    f.write(block)
        files.append(p)
    return files


def read_rate(files: list[Path], threads: int, buffer: str) -> float:
    """Each thread reads its own file in CHUNK pieces with preadv, into one reused buffer, a fresh bytearray
    a piece (what a zeroed allocation costs), or a fresh page-locked tensor from torch's caching allocator."""

    def job(i):
        fd = os.open(files[i], os.O_RDONLY)
        size = os.fstat(fd).st_size
        reused = bytearray(CHUNK)
        try:
            for off in range(0, size, CHUNK):
                if buffer == "reused":
                    view = memoryview(reused)
                elif buffer == "fresh":
                    view = memoryview(bytearray(CHUNK))
                else:
                    view = memoryview(torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True).numpy())
                os.preadv(fd, [view], off)
        finally:
            os.close(fd)

    return sum(files[i].stat().st_size for i in range(threads)) / _timed_threads(threads, job)


def write_rate(work: Path, nbytes: int, threads: int, digest: bool) -> float:
    """Each thread pwrites nbytes into a fresh file of its own (laid out with truncate, as the shard writer
    does), digesting what it writes when asked."""
    data = os.urandom(CHUNK)
    paths = [work / f"ceiling-out-{i}.bin" for i in range(threads)]

    def job(i):
        fd = os.open(paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.ftruncate(fd, nbytes)
        h = hashlib.sha256()
        for off in range(0, nbytes, CHUNK):
            if digest:
                h.update(data)
            os.pwrite(fd, data, off)
        os.close(fd)

    rate = threads * nbytes / _timed_threads(threads, job)
    for p in paths:
        p.unlink()
    return rate


def shared_file_rate(work: Path, nbytes: int, threads: int, how: str) -> float:
    """All threads write disjoint ranges of ONE fresh file, as the writers of one shard do: with ``pwrite``
    (buffered writes into one file take its inode lock on tmpfs, ext4 and XFS) or by copying into a
    mapping of each range (page faults take no inode lock), with the shard writer's own copy."""
    data = memoryview(os.urandom(CHUNK))
    path = work / "ceiling-shared.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.ftruncate(fd, threads * nbytes)

    def job(i):
        for off in range(i * nbytes, (i + 1) * nbytes, CHUNK):
            if how == "pwrite":
                os.pwrite(fd, data, off)
            else:
                copy_mapped(fd, data, off)

    rate = threads * nbytes / _timed_threads(threads, job)
    os.close(fd)
    path.unlink()
    return rate


def copy_rate(nbytes: int, device: str, direction: str) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src, dst = (host, gpu) if direction == "h2d" else (gpu, host)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)  # the copies run on that device's stream, not the current device's
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return 5 * nbytes / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--threads", default="1,4,8")
    ap.add_argument("--file_mb", type=int, default=1024)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.threads.split(",")]
    nbytes = args.file_mb << 20
    files = make_files(work, nbytes, max(counts))
    rows = {}
    for n in counts:
        rows[f"sha256 x{n}"] = sha256_rate(nbytes, n)
        for buffer in ("reused", "fresh", "pinned") if torch.cuda.is_available() else ("reused", "fresh"):
            read_rate(files, n, buffer)  # first pass warms the page cache and the pinned pool
            rows[f"read {buffer} x{n}"] = read_rate(files, n, buffer)
        rows[f"write x{n}"] = write_rate(work, nbytes, n, digest=False)
        rows[f"write+sha256 x{n}"] = write_rate(work, nbytes, n, digest=True)
        rows[f"pwrite one file x{n}"] = shared_file_rate(work, nbytes, n, "pwrite")
        rows[f"mmap one file x{n}"] = shared_file_rate(work, nbytes, n, "mmap")
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            for direction in ("h2d", "d2h"):
                rows[f"{direction} cuda:{d}"] = copy_rate(256 << 20, f"cuda:{d}", direction)
    for p in files:
        p.unlink()
    for k, v in rows.items():
        print(f"{k:24s} {v / 1e9:8.2f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v / 1e9 for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
