"""Reader: the bytes of one tensor at a time, straight from its byte range.

Knows files and dtypes, nothing of quantization or of the vendor encodings (``vendor`` decodes those from
the parts read here). It reads with ``preadv`` into a fresh buffer the
size of the tensor (or of one chunk, for copies), or through page-locked pieces straight into GPU memory;
it never maps or loads a whole shard, so the resident memory is what the caller holds, not what the page
cache has seen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from modelopt_streaming.errors import CheckpointError
from modelopt_streaming.source.index import DTYPES, TensorInfo

__all__ = ["PARALLEL_CHUNK", "TensorReader"]

PARALLEL_CHUNK = 32 * 1024 * 1024


class TensorReader:
    """Reads tensors of one checkpoint directory; keeps at most a few files open. Safe to use from several
    threads at once (positional reads on shared descriptors)."""

    def __init__(self, root: str | Path, max_open_files: int = 16, threads: int = 1):
        self.root = Path(root)
        # A large tensor is read in PARALLEL_CHUNK pieces on ``threads`` threads: one kernel copy at a time
        # is what one thread moves, and a dense 528 MB group read by one thread stalls the pipeline.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="read-chunk") if threads > 1 else None
        self._fds: dict[str, int] = {}  # most recently used last
        self._users: dict[str, int] = {}  # reads in progress per file: such a descriptor is never closed
        self._lock = threading.Lock()
        self._max_open = max_open_files
        self.bytes_read = 0

    def _acquire(self, rel: str) -> int:
        with self._lock:
            fd = self._fds.pop(rel, None)
            if fd is None:
                idle = [r for r in self._fds if not self._users.get(r)]
                if len(self._fds) >= self._max_open and idle:
                    os.close(self._fds.pop(idle[0]))
                fd = os.open(self.root / rel, os.O_RDONLY)
            self._fds[rel] = fd
            self._users[rel] = self._users.get(rel, 0) + 1
            return fd

    def _release(self, rel: str) -> None:
        with self._lock:
            self._users[rel] -= 1

    def _in_pieces(self, nbytes: int, piece: Callable[[int, int], None]) -> None:
        """``piece(offset, n)`` over ``nbytes`` cut into PARALLEL_CHUNK spans, on the pool when there are
        several; the first error is raised."""
        spans = [(o, min(PARALLEL_CHUNK, nbytes - o)) for o in range(0, nbytes, PARALLEL_CHUNK)]
        if self._pool is None or len(spans) < 2:
            for o, n in spans:
                piece(o, n)
            return
        for f in [self._pool.submit(piece, o, n) for o, n in spans]:
            f.result()

    def _read_into(self, info: TensorInfo, offset: int, out: memoryview) -> None:
        self._in_pieces(len(out), lambda o, n: self._read_span(info, offset + o, out[o : o + n]))

    def _read_span(self, info: TensorInfo, offset: int, out: memoryview) -> None:
        fd = self._acquire(info.file)
        try:
            done, start = 0, info.begin + offset
            while done < len(out):
                n = os.preadv(fd, [out[done:]], start + done)
                if not n:
                    raise CheckpointError(
                        f"{self.root / info.file}, tensor {info.name!r}: file ends before the tensor's data "
                        "(truncated shard?)"
                    )
                done += n
        finally:
            self._release(info.file)
        with self._lock:
            self.bytes_read += done

    def read(
        self,
        info: TensorInfo,
        device: torch.device | None = None,
        stream: torch.cuda.Stream | None = None,
    ) -> torch.Tensor:
        """The whole tensor, in its stored dtype and shape, as a fresh CPU tensor.

        With a CUDA ``device``: a tensor on it, copied on ``stream`` (the caller waits for the stream).
        The bytes travel through page-locked pieces of at most PARALLEL_CHUNK, so host memory holds the
        pieces in flight, not the tensor: a 264 MB dense projection would otherwise pin a 512 MB block
        (torch's host allocator rounds to powers of two) and stall its first read for the pinning.

        Raises:
            CheckpointError: the file ends before the tensor's data.
        """
        if device is not None and device.type == "cuda":
            return self._read_to_device(info, device, stream)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._read_into(info, 0, memoryview(buf.numpy()))
        return buf.view(DTYPES[info.dtype][0]).reshape(info.shape)

    def _read_to_device(self, info: TensorInfo, device: torch.device, stream: torch.cuda.Stream | None) -> torch.Tensor:
        stream = stream or torch.cuda.current_stream(device)
        out = torch.empty(info.nbytes, dtype=torch.uint8, device=device)

        def piece(offset: int, nbytes: int) -> None:
            staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self._read_span(info, offset, memoryview(staging.numpy()))
            # The host allocator keeps the piece from reuse until this copy is done (it records an event
            # on the stream), so it can be let go at once.
            with torch.cuda.stream(stream):
                out[offset : offset + nbytes].copy_(staging, non_blocking=True)

        self._in_pieces(info.nbytes, piece)
        return out.view(DTYPES[info.dtype][0]).reshape(info.shape)

    def read_chunk(self, info: TensorInfo, offset: int, nbytes: int) -> bytearray:
        """``nbytes`` raw bytes of the tensor from ``offset``, in a fresh buffer."""
        buf = bytearray(nbytes)
        self._read_into(info, offset, memoryview(buf))
        return buf

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
