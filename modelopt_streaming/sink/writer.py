"""Writer: safetensors shards written tensor by tensor, each under a temporary name until whole.

The header is known before any data (names, dtypes and shapes come from the plan), so a shard is
streamed to disk in one pass and the writer never holds more than the tensor it is given. Knows
nothing of quantization.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from modelopt_streaming import faults
from modelopt_streaming.errors import IncompleteShardError
from modelopt_streaming.source.index import DTYPE_NAMES, TensorSpec

__all__ = [
    "DIGEST_SCHEME",
    "MANIFEST_FILE",
    "PositionalShardWriter",
    "ShardWriter",
    "TensorWrite",
    "copy_mapped",
    "encode_header",
    "file_digest",
    "file_system_of",
    "fsync_dir",
    "partial_name",
    "shard_digest",
    "write_json_atomic",
]

MANIFEST_FILE = "modelopt_streaming.manifest.json"


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


# A shard's digest is a digest of digests: sha256 over sha256(header) followed by sha256(each tensor's bytes)
# in file order. Whoever writes a tensor digests it as it goes, so no output byte is read back to hash a
# shard, whether one process streamed it or several ranks wrote its tensors at their offsets; and the value
# is the same in both cases. ``file_digest`` recomputes it from a file (``--resume --verify``, users).
DIGEST_SCHEME = "sha256 of sha256(header) + sha256(tensor bytes) for each tensor in file order"


def shard_digest(header: bytes, tensor_digests: Sequence[bytes]) -> str:
    return hashlib.sha256(hashlib.sha256(header).digest() + b"".join(tensor_digests)).hexdigest()


def file_digest(path: str | Path, chunk: int = 16 << 20) -> str:
    """The digest of a safetensors file as the writers record it (see DIGEST_SCHEME)."""
    with open(path, "rb", buffering=0) as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        header.pop("__metadata__", None)
        spans = sorted(tuple(e["data_offsets"]) for e in header.values())
        digests = []
        buf = bytearray(chunk)
        view = memoryview(buf)
        for begin, end in spans:
            sha = hashlib.sha256()
            f.seek(8 + n + begin)
            left = end - begin
            while left:
                got = f.readinto(view[: min(chunk, left)])
                if not got:
                    break
                sha.update(view[:got])
                left -= got
            digests.append(sha.digest())
    return shard_digest(struct.pack("<Q", n) + raw, digests)


class _DigestThread:
    """sha256 of each tensor written, computed on its own thread (hashlib releases the GIL), so hashing and
    writing overlap instead of adding up."""

    _NEXT = object()

    def __init__(self):
        self.digests: list[bytes] = []
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sha = None
        while (data := self.q.get()) is not None:
            if data is self._NEXT:
                if sha is not None:
                    self.digests.append(sha.digest())
                sha = hashlib.sha256()
            else:
                sha.update(data)
        if sha is not None:
            self.digests.append(sha.digest())

    def next_tensor(self) -> None:
        self.q.put(self._NEXT)

    def update(self, data) -> None:
        self.q.put(data)

    def finish(self) -> list[bytes]:
        self.q.put(None)
        self.thread.join()
        return self.digests

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
        self._digests = _DigestThread()
        self._tmp = self.directory / partial_name(file_name)
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close/abort
        self._header = encode_header(self.tensors)
        self._f.write(self._header)

    def _emit(self, data) -> None:
        self._f.write(data)
        self._digests.update(data)

    def begin(self, name: str) -> None:
        if self._remaining:
            raise RuntimeError(f"{self.tensors[self._next - 1].name} is not complete")
        if self._next >= len(self.tensors) or self.tensors[self._next].name != name:
            expected = self.tensors[self._next].name if self._next < len(self.tensors) else "nothing"
            raise RuntimeError(f"{self.file_name}: got {name}, expected {expected}")
        self._remaining = self.tensors[self._next].nbytes
        self._next += 1
        self._digests.next_tensor()

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
        fsync_dir(self.directory)
        faults.point("after_rename")
        return {
            "file": self.file_name,
            "size": size,
            "digest": shard_digest(self._header, self._digests.finish()),
            "tensors": [t.name for t in self.tensors],
        }

    def abort(self) -> None:
        self._digests.stop()
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


# Buffered writes into one file are serialized by its inode lock (tmpfs, ext4 and XFS alike): threads and
# ranks writing one 5 GB shard move what one thread moves (2.3-2.7 GB/s on the lent nodes' tmpfs with 1, 8
# or 16 threads). A copy into a mapping of the range takes no inode lock, only page faults: 5.2 GB/s from 8
# threads into one file there (docs/benchmarks.md, section 6). Used only where measured (tmpfs); on a disk the
# device is the limit, and a full disk must stay an error: a mapped copy would get SIGBUS instead of ENOSPC
# (the runner checks the free space before it writes).
MAPPED_FILE_SYSTEMS = ("tmpfs",)
MAPPED_WRITE_MIN_BYTES = 1 << 20


def file_system_of(path: str | Path) -> str:
    """The type of the file system holding ``path`` (its longest mount point in /proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            mounts = f.read().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind


def copy_mapped(fd: int, data: memoryview, offset: int) -> None:
    """``data`` into the file at ``offset`` through a mapping of just that range (numpy's copy releases
    the GIL); unmapped at once, so the mapped pages never add up in this process."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fd, offset + len(data) - start, offset=start)
    try:
        target = np.frombuffer(mapping, dtype=np.uint8, count=len(data), offset=offset - start)
        np.copyto(target, np.frombuffer(data, dtype=np.uint8))
        del target
    finally:
        mapping.close()


class TensorWrite:
    """The bytes of one tensor of a positional shard, written in order at their planned offsets and digested
    on the way. One thread writes one tensor; different tensors may be written by different threads."""

    def __init__(self, shard: PositionalShardWriter, name: str):
        self.shard, self.name = shard, name
        self.cursor, n = shard.offsets[name]
        self.end = self.cursor + n
        self._sha = hashlib.sha256()
        if n == 0:
            shard._tensor_done(name, self._sha.digest())

    def write_bytes(self, data) -> None:
        view = memoryview(data).cast("B")
        if self.cursor + len(view) > self.end:
            raise RuntimeError(f"{self.shard.file_name}: more bytes than declared for {self.name}")
        half = self.cursor + len(view) // 2 if len(view) > 1 and faults.active() else -1
        self._sha.update(view)
        fd = self.shard.fd
        while view:
            piece = view if half < 0 else view[: half - self.cursor]
            if self.shard.mapped and len(piece) >= MAPPED_WRITE_MIN_BYTES:
                copy_mapped(fd, piece, self.cursor)
                n = len(piece)
            else:
                n = os.pwrite(fd, piece, self.cursor)
            self.cursor += n
            view = view[n:]
            if self.cursor == half:  # tests: a crash with half of this tensor on disk
                half = -1
                faults.point("mid_tensor")
        if self.cursor == self.end:
            self.shard._tensor_done(self.name, self._sha.digest())


class PositionalShardWriter:
    """Writes tensors of one shard at their planned offsets, in any order, from several threads and processes.

    ``create`` (once) writes the header and sizes the file; each process then opens it and writes its
    tensors with ``pwrite``, or on tmpfs by copies into mappings (``mapped``; ``open(name)`` gives one
    tensor's writer, for a thread of its own), digesting
    each tensor as it writes it; ``finish`` (once, after all) takes every process's tensor digests, checks
    that they cover the plan, and renames the file. ``on_whole(self)``, if given, is called by the thread that
    completes the last planned tensor when this process wrote them all (one process: the shard can be
    finished at once). Same bytes and digest as ShardWriter.
    """

    def __init__(
        self,
        directory: str | Path,
        file_name: str,
        tensors: Sequence[TensorSpec],
        on_whole=None,
        mapped: bool | None = None,
    ):
        self.directory = Path(directory)
        # Large pieces copied into a mapping instead of pwrite (default: where the file system is one of
        # MAPPED_FILE_SYSTEMS); the same bytes either way.
        self.mapped = file_system_of(directory) in MAPPED_FILE_SYSTEMS if mapped is None else mapped
        self.file_name = file_name
        self.tensors = list(tensors)
        self._header = header = encode_header(self.tensors)
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = len(header)
        for t in self.tensors:
            self.offsets[t.name] = (pos, t.nbytes)
            pos += t.nbytes
        self.size = pos
        self._specs = {t.name: t for t in self.tensors}
        self._tmp = self.directory / partial_name(file_name)
        self.fd = os.open(self._tmp, os.O_RDWR)
        self._lock = threading.Lock()
        self._on_whole = on_whole
        # sha256 of each tensor whose every planned byte this process wrote: finish() renames only a shard
        # whose tensors the processes together digested in full.
        self._digests: dict[str, bytes] = {}

    @staticmethod
    def create(directory: str | Path, file_name: str, tensors: Sequence[TensorSpec]) -> None:
        header = encode_header(list(tensors))
        size = len(header) + sum(t.nbytes for t in tensors)
        with open(Path(directory) / partial_name(file_name), "wb") as f:
            f.write(header)
            f.truncate(size)

    def open(self, name: str) -> TensorWrite:
        if name not in self.offsets:
            raise RuntimeError(f"{self.file_name}: {name} is not in the layout")
        return TensorWrite(self, name)

    def _tensor_done(self, name: str, digest: bytes) -> None:
        with self._lock:
            self._digests[name] = digest
            whole = len(self._digests) == len(self.tensors)
        if whole and self._on_whole is not None:
            self._on_whole(self)

    def digests(self) -> dict[str, bytes]:
        """sha256 of each tensor this process wrote completely, by name."""
        with self._lock:
            return dict(self._digests)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """A whole tensor; safe to call from several threads for different tensors."""
        spec = self._specs.get(name)
        if spec is None or DTYPE_NAMES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"{self.file_name}: {name} {tensor.dtype} {tuple(tensor.shape)} is not in the layout")
        w = self.open(name)
        if tensor.numel():
            w.write_bytes(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        """Close and remove the partial file (one process that owns the shard and stops)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._tmp.unlink(missing_ok=True)

    def finish(self, digests: dict[str, bytes] | None = None) -> dict:
        """Rename the shard to its final name; the manifest record of the shard.

        ``digests``: the tensor digests of all the processes that wrote this shard (default: this process's);
        a shard with a planned tensor nobody wrote completely is never renamed.
        """
        self.close()
        covered = self.digests() if digests is None else digests
        missing = [t for t in self.tensors if t.name not in covered]
        if missing:
            start, n = self.offsets[missing[0].name]
            raise IncompleteShardError(
                f"{self._tmp}: {len(missing)} planned tensor(s) never written, first {missing[0].name!r} "
                f"(bytes {start}-{start + n}); the shard was not renamed; rerun with --resume"
            )
        if self._tmp.stat().st_size != self.size:
            raise RuntimeError(f"{self._tmp}: size {self._tmp.stat().st_size}, planned {self.size}")
        os.replace(self._tmp, self.directory / self.file_name)
        fsync_dir(self.directory)
        faults.point("after_rename")
        return {
            "file": self.file_name,
            "size": self.size,
            "digest": shard_digest(self._header, [covered[t.name] for t in self.tensors]),
            "tensors": [t.name for t in self.tensors],
        }


def fsync_dir(directory: Path) -> None:
    """Make a rename or removal in ``directory`` durable."""
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
