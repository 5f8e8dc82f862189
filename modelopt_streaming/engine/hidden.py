"""Hidden states of every calibration sequence at one layer boundary: in host memory up to a budget, in a
memory-mapped file beyond it, so a run's host memory does not grow with the number of sequences."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

# Hidden states of all sequences kept in host memory before spilling to a file (one store; the engine holds
# two at a time, the layer's input and its output): the least default, whatever the machine.
HOST_BUDGET_BYTES = 4 * 1024**3


def default_host_budget(stores: int = 2) -> int:
    """Bytes one of ``stores`` hidden-state stores may keep in host memory: a quarter of the memory this
    process may use (the machine's, or its cgroup's limit if lower) shared among the stores, at least
    HOST_BUDGET_BYTES. A spilled store costs its layer a write and a read of every row through the page cache:
    512 x 2048 DeepSeek-V3 rows (15 GB a store) took 10 s a dense layer against 2.5 s of compute on an H100
    host (docs/benchmarks.md section 7), while a node that serves such a model has the memory to hold them."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return HOST_BUDGET_BYTES
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            memory = min(memory, int(limit))
    except OSError:
        pass
    return max(HOST_BUDGET_BYTES, memory // 4 // max(1, stores))


_NUMPY_OF = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}


class HiddenStore:
    """``count`` sequences of ``shape`` [L, H] in ``dtype``; ``store[i:j]`` reads a batch, ``store[i:j] = t``
    writes one (from any device), ``store.load(i:j, device)`` gives a batch on a device.

    ``device``: where the batches go. For a GPU the rows in host memory are page-locked, and a spilled store
    moves each batch through a page-locked staging buffer: a pageable copy of a 224 MB batch (8 x 2048 x 7168
    bf16) took 166 ms device-to-host and 29 ms back on an H100, a page-locked one 4.3 ms each way
    (``bench/profile_engine.py``, docs/benchmarks.md), 4x the layer's own forward."""

    def __init__(
        self,
        count: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        budget_bytes: int = HOST_BUDGET_BYTES,
        spill_dir: str | Path | None = None,
        device: torch.device | None = None,
    ):
        self.count, self.shape, self.dtype = count, tuple(shape), dtype
        nbytes = count * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.spilled = nbytes > budget_bytes
        self.owned = True  # a store of its own (not a kept file's mapping): a pass may reuse it for other rows
        self._pin = device is not None and torch.device(device).type == "cuda"
        self._staging: torch.Tensor | None = None
        self._file = None
        if self.spilled:
            # A named file in the spill directory, deleted when the store is closed; the mapping is what the
            # page cache holds, so the process's resident memory stays at the batches in flight.
            self._file = tempfile.NamedTemporaryFile(dir=spill_dir, prefix="hidden-", suffix=".bin")  # noqa: SIM115
            array = np.memmap(self._file.name, dtype=_NUMPY_OF[dtype], mode="w+", shape=(count, *shape))
            self._data = torch.from_numpy(array).view(dtype) if dtype == torch.bfloat16 else torch.from_numpy(array)
        else:
            self._data = torch.empty((count, *shape), dtype=dtype, pin_memory=self._pin)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self._data[rows]

    def __setitem__(self, rows: slice, value: torch.Tensor) -> None:
        if value.device.type == "cuda" and self._data.device.type == "cpu" and not self._data.is_pinned():
            staged = self._stage(self._data[rows])
            staged.copy_(value)
            value = staged
        self._data[rows].copy_(value)

    def load(self, rows: slice, device: torch.device) -> torch.Tensor:
        """The rows on ``device`` (on the CPU: a view of the store, as ``store[rows]``)."""
        batch = self._data[rows]
        if torch.device(device).type != "cuda" or batch.is_pinned():
            return batch.to(device)
        staged = self._stage(batch)
        staged.copy_(batch)
        return staged.to(device)

    def _stage(self, like: torch.Tensor) -> torch.Tensor:
        """A page-locked buffer shaped as ``like`` (kept, grown to the largest batch), for copies to a GPU.

        Copies through it are synchronous (``copy_``/``to`` without ``non_blocking``), so it is free again when
        they return."""
        n = like.numel()
        if self._staging is None or self._staging.numel() < n:
            self._staging = torch.empty(n, dtype=self.dtype, pin_memory=True)
        return self._staging[:n].view(like.shape)

    def save(self, path: str | Path) -> None:
        """Write the rows to ``path`` (raw, row-major): what ``HiddenStore.open`` maps back."""
        with open(path, "wb") as f:
            for i in range(self.count):
                f.write(self._data[i].contiguous().view(torch.uint8).numpy().tobytes())
            f.flush()

    @classmethod
    def open(cls, path: str | Path, count: int, shape: tuple[int, ...], dtype: torch.dtype) -> HiddenStore:
        """The rows ``save`` wrote, mapped from the file (copy on write: the file itself is never changed)."""
        store = cls.__new__(cls)
        store.count, store.shape, store.dtype, store.spilled, store._file = count, tuple(shape), dtype, True, None
        store.owned, store._pin, store._staging = False, False, None
        array = np.memmap(path, dtype=_NUMPY_OF[dtype], mode="c", shape=(count, *shape))
        store._data = torch.from_numpy(array).view(dtype) if dtype == torch.bfloat16 else torch.from_numpy(array)
        return store

    def close(self) -> None:
        self._data = None
        self._staging = None
        if self._file is not None:
            self._file.close()
            self._file = None
