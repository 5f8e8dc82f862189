"""Writer: safetensors shards written tensor by tensor, each under a temporary name until whole.

The header is known before any data (names, dtypes and shapes come from the plan), so a shard is
streamed to disk in one pass and the writer never holds more than the tensor it is given. Knows
nothing of quantization.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import faults
from .index import DTYPE_NAMES, DTYPES

MANIFEST_FILE = "modelopt_streaming.manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def encode_header(tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``tensors`` in this order."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the safetensors library does
    return len(raw).to_bytes(8, "little") + raw


def partial_name(file_name: str) -> str:
    return f".{file_name}.partial"


class IncompleteShardError(RuntimeError):
    """A shard is about to be renamed while some of its planned bytes were never written."""


class _Sha256Thread:
    """sha256 of the bytes written, computed on its own thread (hashlib releases the GIL), so hashing and
    writing overlap instead of adding up."""

    def __init__(self):
        self.sha = hashlib.sha256()
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (data := self.q.get()) is not None:
            self.sha.update(data)

    def update(self, data) -> None:
        self.q.put(data)

    def hexdigest(self) -> str:
        self.q.put(None)
        self.thread.join()
        return self.sha.hexdigest()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()


class ShardWriter:
    """Writes one shard: ``write`` each tensor in the declared order, then ``close`` (or ``abort``)."""

    def __init__(self, directory: str | Path, file_name: str, tensors: Sequence[TensorSpec]):
        self.directory = Path(directory)
        self.file_name = file_name
        self.tensors = list(tensors)
        self._next = 0
        self._remaining = 0
        self._sha = _Sha256Thread()
        self._tmp = self.directory / partial_name(file_name)
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close/abort
        self._emit(encode_header(self.tensors))

    def _emit(self, data) -> None:
        self._f.write(data)
        self._sha.update(data)

    def begin(self, name: str) -> None:
        if self._remaining:
            raise RuntimeError(f"{self.tensors[self._next - 1].name} is not complete")
        if self._next >= len(self.tensors) or self.tensors[self._next].name != name:
            expected = self.tensors[self._next].name if self._next < len(self.tensors) else "nothing"
            raise RuntimeError(f"{self.file_name}: got {name}, expected {expected}")
        self._remaining = self.tensors[self._next].nbytes
        self._next += 1

    def write_bytes(self, data) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n > self._remaining:
            raise RuntimeError(f"{self.file_name}: more bytes than declared for {self.tensors[self._next - 1].name}")
        if n > 1 and faults.active():  # tests: a crash with half of this tensor on disk
            view = memoryview(data).cast("B")
            self._emit(view[: n // 2])
            faults.point("mid_tensor", flush=self._f.flush)
            self._emit(view[n // 2 :])
        else:
            self._emit(data)
        self._remaining -= n

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.tensors[self._next] if self._next < len(self.tensors) else None
        if (
            spec is not None
            and spec.name == name
            and (DTYPE_NAMES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape)
        ):
            raise RuntimeError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, declared {spec.dtype} {spec.shape}")
        self.begin(name)
        if tensor.numel():
            self.write_bytes(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> dict:
        """Flush, fsync and rename to the final name; returns the manifest record of the shard."""
        if self._remaining or self._next != len(self.tensors):
            raise RuntimeError(f"{self.file_name}: closed before all tensors were written")
        self._f.flush()
        os.fsync(self._f.fileno())
        size = self._f.tell()
        self._f.close()
        os.replace(self._tmp, self.directory / self.file_name)
        _fsync_dir(self.directory)
        faults.point("after_rename")
        return {
            "file": self.file_name,
            "size": size,
            "sha256": self._sha.hexdigest(),
            "tensors": [t.name for t in self.tensors],
        }

    def abort(self) -> None:
        self._sha.stop()
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


class PositionalShardWriter:
    """Writes tensors of one shard at their planned offsets, in any order, from several processes.

    ``create`` (once) writes the header and sizes the file; each process then opens it and ``write``s its
    tensors with ``pwrite``; ``finish`` (once, after all) fsyncs, hashes the file and renames it. Same
    interface as ShardWriter for the tensors (begin / write_bytes / write), same bytes.
    """

    def __init__(self, directory: str | Path, file_name: str, tensors: Sequence[TensorSpec]):
        self.directory = Path(directory)
        self.file_name = file_name
        self.tensors = list(tensors)
        header = encode_header(self.tensors)
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = len(header)
        for t in self.tensors:
            self.offsets[t.name] = (pos, t.nbytes)
            pos += t.nbytes
        self.size = pos
        self._specs = {t.name: t for t in self.tensors}
        self._tmp = self.directory / partial_name(file_name)
        self._fd = os.open(self._tmp, os.O_WRONLY)
        self._cursor = self._end = 0
        self._current: str | None = None
        # Tensors whose every planned byte this process wrote: finish() renames only a fully covered shard.
        self._complete: set[str] = set()

    @staticmethod
    def create(directory: str | Path, file_name: str, tensors: Sequence[TensorSpec]) -> None:
        header = encode_header(list(tensors))
        size = len(header) + sum(t.nbytes for t in tensors)
        with open(Path(directory) / partial_name(file_name), "wb") as f:
            f.write(header)
            f.truncate(size)

    def begin(self, name: str) -> None:
        if self._cursor != self._end:
            raise RuntimeError(f"{self.file_name}: previous tensor incomplete before {name}")
        self._cursor, n = self.offsets[name]
        self._end = self._cursor + n
        self._current = name
        if n == 0:
            self._complete.add(name)

    def write_bytes(self, data) -> None:
        view = memoryview(data).cast("B")
        if self._cursor + len(view) > self._end:
            raise RuntimeError(f"{self.file_name}: more bytes than declared")
        half = self._cursor + len(view) // 2 if len(view) > 1 and faults.active() else -1
        while view:
            n = os.pwrite(self._fd, view if half < 0 else view[: half - self._cursor], self._cursor)
            self._cursor += n
            view = view[n:]
            if self._cursor == half:  # tests: a crash with half of this tensor on disk
                half = -1
                faults.point("mid_tensor")
        if self._cursor == self._end and self._current is not None:
            self._complete.add(self._current)

    def written(self) -> set[str]:
        """Names of the tensors this process wrote completely."""
        return set(self._complete)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs.get(name)
        if spec is None or DTYPE_NAMES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"{self.file_name}: {name} {tensor.dtype} {tuple(tensor.shape)} is not in the layout")
        self.begin(name)
        if tensor.numel():
            self.write_bytes(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def finish(self, written: set[str] | None = None) -> dict:
        """Hash the whole file, rename it to its final name; the manifest record of the shard.

        ``written``: the tensors completed by all the processes that wrote this shard (default: this
        process's); a shard with a planned byte range nobody wrote is never renamed.
        """
        self.close()
        covered = self._complete if written is None else written
        missing = [t for t in self.tensors if t.name not in covered]
        if missing:
            start, n = self.offsets[missing[0].name]
            raise IncompleteShardError(
                f"{self._tmp}: {len(missing)} planned tensor(s) never written, first {missing[0].name!r} "
                f"(bytes {start}-{start + n}); the shard was not renamed"
            )
        sha = hashlib.sha256()
        with open(self._tmp, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                sha.update(chunk)
        if self._tmp.stat().st_size != self.size:
            raise RuntimeError(f"{self._tmp}: size {self._tmp.stat().st_size}, planned {self.size}")
        os.replace(self._tmp, self.directory / self.file_name)
        _fsync_dir(self.directory)
        faults.point("after_rename")
        return {
            "file": self.file_name,
            "size": self.size,
            "sha256": sha.hexdigest(),
            "tensors": [t.name for t in self.tensors],
        }


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    faults.point("json")  # tests: a crash with the new file complete under its temporary name
    os.replace(tmp, path)
