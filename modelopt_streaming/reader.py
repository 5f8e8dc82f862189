"""Reader: the bytes of one tensor at a time, straight from its byte range.

Knows files and dtypes, nothing of quantization. It reads with ``readinto`` into a fresh buffer the
size of the tensor (or of one chunk, for copies), never maps or loads a whole shard, so the resident
memory is what the caller holds, not what the page cache has seen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .index import DTYPES, CheckpointError, TensorInfo


class TensorReader:
    """Reads tensors of one checkpoint directory; keeps at most a few files open."""

    def __init__(self, root: str | Path, max_open_files: int = 8):
        self.root = Path(root)
        self._files: dict[str, object] = {}
        self._max_open = max_open_files
        self.bytes_read = 0

    def _file(self, rel: str):
        f = self._files.pop(rel, None)
        if f is None:
            if len(self._files) >= self._max_open:
                oldest = next(iter(self._files))
                self._files.pop(oldest).close()
            f = open(self.root / rel, "rb", buffering=0)  # noqa: SIM115 - cached handle
        self._files[rel] = f  # most recently used last
        return f

    def _read_into(self, info: TensorInfo, offset: int, out: memoryview) -> None:
        f = self._file(info.file)
        f.seek(info.begin + offset)
        done = 0
        while done < len(out):
            n = f.readinto(out[done:])
            if not n:
                raise CheckpointError(
                    f"{self.root / info.file}, tensor {info.name!r}: file ends before the tensor's data "
                    "(truncated shard?)"
                )
            done += n
        self.bytes_read += done

    def read(self, info: TensorInfo, pin_memory: bool = False) -> torch.Tensor:
        """The whole tensor, in its stored dtype and shape (a fresh CPU tensor; page-locked on request,
        so that a copy to the GPU can run asynchronously)."""
        buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        if info.nbytes:
            self._read_into(info, 0, memoryview(buf.numpy()))
        return buf.view(DTYPES[info.dtype][0]).reshape(info.shape)

    def read_chunk(self, info: TensorInfo, offset: int, nbytes: int) -> bytearray:
        """``nbytes`` raw bytes of the tensor from ``offset``, in a fresh buffer."""
        buf = bytearray(nbytes)
        self._read_into(info, offset, memoryview(buf))
        return buf

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
