"""Overlap of reading, computing and writing, with memory still bounded.

A reader thread walks the work units ahead of the compute thread, holding at most ``budget`` bytes of
source data in flight (always at least one unit, so a group larger than the budget still goes through);
a writer thread drains encoded tensors to the shard file in order. Both threads only move bytes; the
runner decides what they are.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

_DONE = object()


@dataclass
class Throughput:
    """Seconds each stage spent busy, and bytes it moved: the progress line shows the bottleneck."""

    read_s: float = 0.0
    read_bytes: int = 0
    compute_s: float = 0.0
    write_s: float = 0.0
    write_bytes: int = 0

    def line(self) -> str:
        def rate(b: int, s: float) -> str:
            return f"{b / s / 1e6:.0f} MB/s" if s > 0 else "-"

        return (
            f"read {rate(self.read_bytes, self.read_s)}, compute {rate(self.read_bytes, self.compute_s)}, "
            f"write {rate(self.write_bytes, self.write_s)}"
        )


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
    items: Iterable[Any], load: Callable[[Any], Any], size: Callable[[Any], int], budget: int, stats: Throughput
) -> Iterator[tuple[Any, Any]]:
    """Yields ``(item, load(item))`` in order, loading in a thread up to ``budget`` bytes ahead.

    Errors in ``load`` are raised here, in the consumer, at the item that failed.
    """
    budget_ = _ByteBudget(budget)
    out: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def work() -> None:
        try:
            for item in items:
                n = size(item)
                budget_.acquire(n, cancelled)
                if cancelled.is_set():
                    return
                t = time.perf_counter()
                data = load(item)
                stats.read_s += time.perf_counter() - t
                stats.read_bytes += n
                out.put((item, data, n, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            out.put((None, None, 0, e))
            return
        out.put(_DONE)

    thread = threading.Thread(target=work, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            got = out.get()
            if got is _DONE:
                break
            item, data, n, error = got
            if error is not None:
                raise error
            try:
                yield item, data
            finally:
                budget_.release(n)
    finally:
        cancelled.set()
        thread.join()


class BackgroundWriter:
    """Runs ``write(*args)`` calls in order on one thread; at most ``depth`` calls wait in the queue."""

    def __init__(self, stats: Throughput, depth: int = 3):
        self.stats = stats
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is _DONE:
                return
            if self.error is not None:
                continue
            fn, args, nbytes = job
            t = time.perf_counter()
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - raised in the caller at the next submit/close
                self.error = e
            self.stats.write_s += time.perf_counter() - t
            self.stats.write_bytes += nbytes

    def submit(self, fn: Callable, *args, nbytes: int = 0) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((fn, args, nbytes))

    def close(self) -> None:
        """Wait for every submitted call; raise the first error."""
        self.q.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error
