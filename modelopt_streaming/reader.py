"""Reader: the bytes of one tensor at a time, straight from its byte range.

Knows files and dtypes, nothing of quantization. It reads with ``readinto`` into a buffer the size
of the tensor (or of one chunk, for copies), never maps or loads a whole shard, so the resident
memory is what the caller holds, not what the page cache has seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .index import DTYPES, CheckpointError, TensorInfo

COPY_CHUNK_BYTES = 64 * 1024 * 1024


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

    def iter_chunks(self, info: TensorInfo, chunk_bytes: int = COPY_CHUNK_BYTES) -> Iterator[memoryview]:
        """The tensor's raw bytes in bounded chunks, for tensors that are copied unchanged.

        The same buffer is reused: consume each chunk before asking for the next.
        """
        buf = memoryview(bytearray(min(chunk_bytes, max(1, info.nbytes))))
        for offset in range(0, info.nbytes, chunk_bytes):
            n = min(chunk_bytes, info.nbytes - offset)
            self._read_into(info, offset, buf[:n])
            yield buf[:n]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
