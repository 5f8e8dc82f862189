"""Overlap of reading, computing and writing, with memory still bounded.

A dispatcher walks the work units ahead of the compute thread and hands them to a few reader threads,
holding at most ``budget`` bytes of source data in flight (always at least one unit, so a group larger than
the budget still goes through); the units come back in order. A few writer threads drain encoded tensors to
their shard files, calls for the same tensor in order on one thread. One stream of reads or writes is
one kernel copy at a time; fast storage (NVMe RAID, tmpfs, parallel file systems) serves several at once.
These threads only move bytes; the runner decides what they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

_DONE = object()


@dataclass
class Throughput:
    """Seconds each stage spent busy, and bytes it moved: the progress line shows the bottleneck. A stage
    served by several threads is busy while any of them is (its rate is the stage's, not one thread's)."""

    read_s: float = 0.0
    read_bytes: int = 0
    compute_s: float = 0.0
    write_s: float = 0.0
    write_bytes: int = 0
    # Seconds the compute thread waited for a unit to be read, and for room in the writers' budget.
    wait_read_s: float = 0.0
    wait_write_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _active: dict = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def busy(self, stage: str, nbytes: int = 0):
        """Counts the time while at least one thread works in ``stage`` ("read" or "write")."""
        with self._lock:
            active, since = self._active.get(stage, (0, 0.0))
            self._active[stage] = (active + 1, time.perf_counter() if active == 0 else since)
        try:
            yield
        finally:
            with self._lock:
                active, since = self._active[stage]
                self._active[stage] = (active - 1, since)
                if active == 1:
                    setattr(self, f"{stage}_s", getattr(self, f"{stage}_s") + time.perf_counter() - since)
                setattr(self, f"{stage}_bytes", getattr(self, f"{stage}_bytes") + nbytes)

    def line(self) -> str:
        def rate(b: int, s: float) -> str:
            return f"{b / s / 1e6:.0f} MB/s" if s > 0 else "-"

        return (
            f"read {rate(self.read_bytes, self.read_s)}, compute {rate(self.read_bytes, self.compute_s)}, "
            f"write {rate(self.write_bytes, self.write_s)}; compute waited {self.wait_read_s:.1f} s for reads, "
            f"{self.wait_write_s:.1f} s for writers"
        )


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_BUFFER_BYTES = 1 << 20


def map_large_buffers() -> None:
    """Have glibc map every allocation of LARGE_BUFFER_BYTES or more and unmap it when freed.

    By default glibc raises its mapping threshold to the largest block freed so far (up to 32 MB); after the
    first tensor is freed, tensor buffers come from per-thread arenas that keep what is freed, and the
    process grows with the number of reader and writer threads instead of with what the pipeline holds.
    A fixed threshold keeps the peak at the read-ahead and write budgets. No effect off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)


class _ByteBudget:
    """Bytes loaded and not yet released by the consumer: at most ``budget``, or one item alone when a
    single item is larger."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.cond = threading.Condition()
        # Set while the reader waits for room: the memory tests hold the consumer until then, which is
        # the most the read-ahead can ever hold.
        self.waiting = threading.Event()

    def acquire(self, n: int, cancelled: threading.Event) -> None:
        with self.cond:
            while self.used and self.used + n > self.budget and not cancelled.is_set():
                self.waiting.set()
                self.cond.wait(0.1)
            self.waiting.clear()
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def read_ahead(
    items: Iterable[Any],
    load: Callable[[Any], Any],
    size: Callable[[Any], int],
    budget: int,
    stats: Throughput,
    workers: int = 1,
) -> Iterator[tuple[Any, Any]]:
    """Yields ``(item, load(item))`` in order, loading on ``workers`` threads up to ``budget`` bytes ahead.

    Errors in ``load`` are raised here, in the consumer, at the item that failed.
    """
    budget_ = _ByteBudget(budget)
    out: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="reader")

    def timed(item: Any, n: int) -> Any:
        with stats.busy("read", n):
            return load(item)

    def dispatch() -> None:
        try:
            for item in items:
                n = size(item)
                budget_.acquire(n, cancelled)
                if cancelled.is_set():
                    return
                out.put((item, pool.submit(timed, item, n), n))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            out.put((None, e, 0))
            return
        out.put(_DONE)

    thread = threading.Thread(target=dispatch, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            got = out.get()
            if got is _DONE:
                break
            item, loaded, n = got
            if isinstance(loaded, BaseException):
                raise loaded
            try:
                t = time.perf_counter()
                data = loaded.result()
                stats.wait_read_s += time.perf_counter() - t
                yield item, data
            finally:
                budget_.release(n)
    finally:
        cancelled.set()
        thread.join()
        pool.shutdown(wait=True, cancel_futures=True)


class ParallelWriter:
    """Runs write calls on ``threads`` threads, with at most ``budget`` bytes of them queued (or one call
    alone, when larger). Calls of one ``lane`` run in submission order on thread ``lane % threads`` (a
    lane writes its own files, so the threads do not queue on one file's lock); a call without a lane goes
    to the thread with the fewest bytes queued."""

    def __init__(self, stats: Throughput, threads: int, budget: int):
        self.stats = stats
        self.error: BaseException | None = None
        self._budget = _ByteBudget(budget)
        self._never = threading.Event()
        self._lock = threading.Lock()
        self._queued = [0] * max(1, threads)
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in self._queued]
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"writer-{i}", daemon=True)
            for i in range(len(self._queues))
        ]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        q = self._queues[i]
        while (job := q.get()) is not _DONE:
            fn, args, nbytes = job
            if self.error is None:
                try:
                    with self.stats.busy("write", nbytes):
                        fn(*args)
                except BaseException as e:  # noqa: BLE001 - raised in the caller at the next submit/close
                    self.error = self.error or e
            with self._lock:
                self._queued[i] -= nbytes
            self._budget.release(nbytes)

    def submit(self, fn: Callable, *args, nbytes: int = 0, lane: int | None = None) -> None:
        if self.error is not None:
            raise self.error
        t = time.perf_counter()
        self._budget.acquire(nbytes, self._never)
        self.stats.wait_write_s += time.perf_counter() - t
        with self._lock:
            if lane is not None:
                i = lane % len(self._queues)
            else:
                i = min(range(len(self._queued)), key=self._queued.__getitem__)
            self._queued[i] += nbytes
        self._queues[i].put((fn, args, nbytes))

    def close(self) -> None:
        """Wait for every submitted call; raise the first error."""
        for q in self._queues:
            q.put(_DONE)
        for t in self._threads:
            t.join()
        if self.error is not None:
            raise self.error
