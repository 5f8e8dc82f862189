"""Hidden states of every calibration sequence at one layer boundary: in host memory up to a budget, in a
memory-mapped file beyond it, so a run's host memory does not grow with the number of sequences."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

# Hidden states of all sequences kept in host memory before spilling to a file (one store; the engine holds
# two at a time, the layer's input and its output).
HOST_BUDGET_BYTES = 4 * 1024**3

_NUMPY_OF = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}


class HiddenStore:
    """``count`` sequences of ``shape`` [L, H] in ``dtype``; ``store[i:j]`` reads a batch, ``store[i:j] = t``
    writes one (from any device)."""

    def __init__(
        self,
        count: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        budget_bytes: int = HOST_BUDGET_BYTES,
        spill_dir: str | Path | None = None,
    ):
        self.count, self.shape, self.dtype = count, tuple(shape), dtype
        nbytes = count * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.spilled = nbytes > budget_bytes
        self._file = None
        if self.spilled:
            # A named file in the spill directory, deleted when the store is closed; the mapping is what the
            # page cache holds, so the process's resident memory stays at the batches in flight.
            self._file = tempfile.NamedTemporaryFile(dir=spill_dir, prefix="hidden-", suffix=".bin")  # noqa: SIM115
            array = np.memmap(self._file.name, dtype=_NUMPY_OF[dtype], mode="w+", shape=(count, *shape))
            self._data = torch.from_numpy(array).view(dtype) if dtype == torch.bfloat16 else torch.from_numpy(array)
        else:
            self._data = torch.empty((count, *shape), dtype=dtype)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self._data[rows]

    def __setitem__(self, rows: slice, value: torch.Tensor) -> None:
        self._data[rows].copy_(value)

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
        array = np.memmap(path, dtype=_NUMPY_OF[dtype], mode="c", shape=(count, *shape))
        store._data = torch.from_numpy(array).view(dtype) if dtype == torch.bfloat16 else torch.from_numpy(array)
        return store

    def close(self) -> None:
        self._data = None
        if self._file is not None:
            self._file.close()
            self._file = None
