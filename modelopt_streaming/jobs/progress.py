"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise, nothing when quiet."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["PROGRESS_MODES", "Progress"]

# "auto": the bar on a terminal, log lines otherwise.
PROGRESS_MODES = ("auto", "bar", "log", "none")
_log = logging.getLogger(__name__)


class Progress:
    """Bytes done of ``total_bytes``: a bar (``mode`` "bar"), a log line every ``every_s`` seconds and at
    the end ("log"), or nothing ("none"); "auto" is the bar on a terminal, else log lines."""

    def __init__(self, total_bytes: int, mode: str = "auto", every_s: float = 10.0):
        self.total = total_bytes
        self.done = 0
        self.every = every_s
        self.started = self._last = time.monotonic()
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize")

    def set_total(self, total_bytes: int) -> None:
        self.total = total_bytes
        if self._bar is not None:
            self._bar.total = total_bytes
            self._bar.refresh()

    def advance(self, nbytes: int, stages=None) -> None:
        """``stages`` (a pipeline.Throughput) adds the read, compute and write rates to the line."""
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            if stages is not None and time.monotonic() - self._last >= 1.0:
                self._last = time.monotonic()
                self._bar.set_postfix_str(stages.line(), refresh=False)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last >= self.every or self.done >= self.total:
                self._last = now
                elapsed = now - self.started
                rate = self.done / max(elapsed, 1e-9)
                eta = (self.total - self.done) / rate if rate else float("inf")
                _log.info(
                    f"progress: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s, ETA {eta:.0f} s"
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
