"""Deterministic fault injection for the reliability tests: no effect unless MODELOPT_STREAMING_FAULT is set.

The writer, the output-directory state and the runner call ``point(kind)`` at the steps where a crash
matters. With ``MODELOPT_STREAMING_FAULT="KIND:K[:ACTION][:rank=R]"`` the K-th call (counted from 1 in
this process) of that kind does ACTION:

- ``kill`` (default): SIGKILL this process, as a power cut or the OOM killer would, with the bytes
  already handed to the kernel left on disk.
- ``pause``: create the file named by MODELOPT_STREAMING_FAULT_MARKER, then wait until that file is
  removed. Only main-thread points (``unit``) should pause where the test then signals the process:
  Python runs signal handlers in the main thread.

``rank=R`` limits the fault to the process whose RANK is R (torchrun tests). With
MODELOPT_STREAMING_FAULT_LOG=PATH every point appends its kind to PATH, so a test can enumerate how many
steps of each kind a run has and cover each one. Kinds:

- ``mid_tensor``: half of a tensor's bytes written to the partial shard (flushed), the other half not.
- ``after_rename``: a shard renamed to its final name, its record not yet written.
- ``json``: a JSON file (manifest, shard record, index, config.json, provenance, hf_quant_config.json)
  written under its temporary name, not yet renamed.
- ``resume``: between the steps a resumed run takes to clear the previous run's configs and stale files.
- ``unit``: the main thread has handed one read item (a unit or a chunk of a copied tensor) to the writer.
- ``layer``: a calibration has run one more decoder layer (and kept its boundary, when one was due).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ENV = "MODELOPT_STREAMING_FAULT"
MARKER_ENV = "MODELOPT_STREAMING_FAULT_MARKER"
LOG_ENV = "MODELOPT_STREAMING_FAULT_LOG"
KINDS = ("mid_tensor", "after_rename", "json", "resume", "unit", "layer")


@dataclass
class _Config:
    pid: int
    kind: str | None = None
    at: int = 0
    action: str = "kill"
    log: str | None = None
    counts: dict[str, int] = field(default_factory=dict)


_config: _Config | None = None
# Writer threads reach points concurrently: the K-th call is counted under a lock.
_count_lock = threading.Lock()


def _load() -> _Config:
    """Parsed once per process: a forked child starts counting afresh from its own environment."""
    global _config
    if _config is not None and _config.pid == os.getpid():
        return _config
    cfg = _Config(pid=os.getpid(), log=os.environ.get(LOG_ENV) or None)
    spec = os.environ.get(ENV, "")
    if spec:
        parts = spec.split(":")
        rank = next((p.split("=", 1)[1] for p in parts if p.startswith("rank=")), None)
        parts = [p for p in parts if not p.startswith("rank=")]
        if len(parts) < 2 or parts[0] not in KINDS or not parts[1].isdigit() or int(parts[1]) < 1:
            raise ValueError(f"{ENV}={spec!r}: expected KIND:K[:kill|pause][:rank=R] with KIND one of {KINDS}")
        action = parts[2] if len(parts) > 2 else "kill"
        if action not in ("kill", "pause"):
            raise ValueError(f"{ENV}={spec!r}: action must be kill or pause")
        if rank is None or rank == os.environ.get("RANK", "0"):
            cfg.kind, cfg.at, cfg.action = parts[0], int(parts[1]), action
    _config = cfg
    return cfg


def active() -> bool:
    cfg = _load()
    return cfg.kind is not None or cfg.log is not None


def point(kind: str, flush: Callable[[], None] | None = None) -> None:
    """One step of ``kind``; ``flush`` pushes buffered bytes to the kernel before a kill."""
    cfg = _load()
    if cfg.kind is None and cfg.log is None:
        return
    with _count_lock:
        n = cfg.counts[kind] = cfg.counts.get(kind, 0) + 1
        if cfg.log:
            with open(cfg.log, "a") as f:
                f.write(f"{kind}\n")
    if kind != cfg.kind or n != cfg.at:
        return
    if flush is not None:
        flush()
    if cfg.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    marker = Path(os.environ[MARKER_ENV])
    marker.touch()
    while marker.exists():  # the test removes it to let the run go on, or signals the process
        time.sleep(0.01)
