"""The output directory's state: what is finished, provably, so that a run can resume exactly.

Each finished shard gets a record (tensors, byte size, digest) written atomically after the shard's
rename; the manifest holds the fingerprint of the source and of the options. A resumed run keeps only
shards whose record and file agree, removes partial and stale shards of its own plan, and refuses when
the source or the options changed. One run at a time holds the directory's lock. Knows files and
records, nothing of quantization.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import filecmp
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from modelopt_streaming import faults
from modelopt_streaming.errors import OutputStateError, UsageError
from modelopt_streaming.formats.interchange import PROVENANCE_FILE
from modelopt_streaming.plan.build import Plan, Recipe
from modelopt_streaming.sink.writer import MANIFEST_FILE, file_digest, fsync_dir, partial_name, write_json_atomic
from modelopt_streaming.source.index import INDEX_FILE, CheckpointIndex, source_fingerprint
from modelopt_streaming.version import __version__

RECORDS_DIR = ".modelopt_streaming"
# Written last by a finished run; its absence marks an unfinished output directory.
FINISHED_MARKER = "hf_quant_config.json"
CONFIG_FILE = "config.json"
# Held (flock) by the one run that may write the directory; names that run (pid, host) for any other.
LOCK_FILE = ".modelopt_streaming.lock"
_SHARD_NAME = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
# What a run writes besides shards and copied side files.
_OWN_NAMES = {MANIFEST_FILE, PROVENANCE_FILE, FINISHED_MARKER, INDEX_FILE, CONFIG_FILE, LOCK_FILE}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


class OutputDirLock:
    """An exclusive ``flock`` on LOCK_FILE inside the output directory, held for the whole run, so that a
    second run (quantize, --resume or --overwrite) on the same directory refuses at once instead of
    interleaving its writes. The kernel drops the lock when the holder dies, even by SIGKILL; the file
    then stays behind with the dead run's pid, and the next run takes it over."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_FILE
        self._fd = -1

    def acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                owner = _lock_owner(fd)
                os.close(fd)
                raise OutputStateError(
                    f"output directory {self.dir} is in use by another modelopt-streaming run ({owner}); "
                    "wait for it to finish or stop it, then rerun"
                ) from None
            # A finishing run unlinks the file it held: if that happened between our open and flock,
            # we hold a lock on a file nobody else will open; take the one now at the path instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode() + b"\n", 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)  # while still held: nobody can take a lock on it meanwhile
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that is just starting"


class OutputState:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.records_dir = self.dir / RECORDS_DIR

    def prepare(
        self,
        fingerprint: dict,
        planned: dict[str, list[str]],
        resume: bool,
        verify: bool,
        overwrite: bool,
        source_dir: str | Path | None = None,
    ) -> dict[str, dict]:
        """Make the directory ready (the caller holds its OutputDirLock); returns the records of shards
        already finished (resume only). ``source_dir``: files identical to the source's count as ours
        (copied side files) when --overwrite decides what it may delete."""
        entries = [p for p in self.dir.iterdir() if p.name != LOCK_FILE] if self.dir.exists() else []
        if entries and not resume:
            if not overwrite:
                raise OutputStateError(
                    f"output directory {self.dir} is not empty (use --resume to continue an "
                    "interrupted run, or --overwrite to replace it)"
                )
            self._clear_own_output(entries, source_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest_path = self.dir / MANIFEST_FILE
        if not manifest_path.exists():
            # A run that died while writing its first manifest leaves only that and its records folder.
            first_write = (RECORDS_DIR, LOCK_FILE, partial_name(MANIFEST_FILE))
            if any(p.name not in first_write for p in self.dir.iterdir()):
                raise OutputStateError(
                    f"{self.dir} holds files but no {MANIFEST_FILE}: it is not a "
                    "modelopt-streaming output; use --overwrite to replace it"
                )
            (self.dir / partial_name(MANIFEST_FILE)).unlink(missing_ok=True)
            self._start(fingerprint)
            return {}
        manifest = json.loads(manifest_path.read_text())
        changed = _differences(manifest.get("fingerprint", {}), fingerprint)
        if changed:
            raise OutputStateError(
                f"cannot resume into {self.dir}: the source or options changed since that run "
                f"({', '.join(changed[:4])}); use --overwrite to start over"
            )
        # An unfinished directory must never look loadable, even if this run dies too: vLLM reads
        # config.json first (its quantization_config), our validators key on hf_quant_config.json.
        for name in (CONFIG_FILE, FINISHED_MARKER, INDEX_FILE, PROVENANCE_FILE):
            (self.dir / name).unlink(missing_ok=True)
            fsync_dir(self.dir)
            faults.point("resume")
        records = {r["file"]: r for r in manifest.get("shards", [])}
        if self.records_dir.exists():
            for p in self.records_dir.glob("*.json"):
                try:
                    rec = json.loads(p.read_text())
                except json.JSONDecodeError:
                    p.unlink()
                    continue
                records[rec["file"]] = rec
        done = {}
        for name, rec in records.items():
            path = self.dir / name
            ok = (
                name in planned
                and rec.get("tensors") == planned[name]
                and path.is_file()
                and path.stat().st_size == rec.get("size")
                and (not verify or file_digest(path) == rec.get("digest"))
            )
            if ok:
                done[name] = rec
        # Only what this plan names: partial files and shards without a valid record; a file the user
        # put here is not ours to delete.
        partials = {f".{n}.partial" for n in (*planned, *_OWN_NAMES)}
        for p in self.dir.iterdir():
            if p.name in partials or (p.name in planned and p.name not in done):
                p.unlink()
        faults.point("resume")
        # Records first, then the manifest: a crash in between loses no finished shard.
        if self.records_dir.exists():
            for p in self.records_dir.iterdir():
                if p.is_file() and p.name.removesuffix(".json") not in done:
                    p.unlink()
        self.records_dir.mkdir(exist_ok=True)
        for rec in done.values():
            self.record(rec)
        self._start(fingerprint)
        return done

    def _clear_own_output(self, entries: list[Path], source_dir: str | Path | None) -> None:
        """--overwrite: delete a previous run's output, and only that; refuse (deleting nothing) if the
        directory is not provably ours or holds a file we did not write."""
        names = {p.name for p in entries}
        if not names & {MANIFEST_FILE, PROVENANCE_FILE, partial_name(MANIFEST_FILE)}:
            raise OutputStateError(
                f"--overwrite refused: {self.dir} is not a modelopt-streaming output (no {MANIFEST_FILE} "
                f"or {PROVENANCE_FILE}); nothing was deleted"
            )
        foreign = self._foreign_files(source_dir)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputStateError(
                f"--overwrite refused: {self.dir / foreign[0]} was not written by modelopt-streaming{more}; "
                "nothing was deleted (move your files out, or choose another output directory)"
            )
        for p in entries:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        fsync_dir(self.dir)

    def _foreign_files(self, source_dir: str | Path | None) -> list[str]:
        """Relative paths of files under the directory that no run of ours wrote."""
        known_shards, side_files = set(), set()
        for meta in (MANIFEST_FILE, PROVENANCE_FILE):
            try:
                data = json.loads((self.dir / meta).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                known_shards |= {s.get("file") for s in data.get("shards") or [] if isinstance(s, dict)}
                side_files |= set(data.get("side_files") or [])
        foreign = []
        for p in sorted(self.dir.rglob("*")):
            rel = p.relative_to(self.dir)
            if p.is_dir() and not p.is_symlink():
                continue
            if rel.parts[0] == RECORDS_DIR:
                continue
            if len(rel.parts) == 1 and (
                p.name in _OWN_NAMES
                or p.name in known_shards
                or _SHARD_NAME.match(p.name)
                or (p.name.startswith(".") and p.name.endswith(".partial"))
            ):
                continue
            if str(rel) in side_files:
                continue
            # A side file copied by a run that died before its provenance: identical to the source's copy,
            # so deleting it loses nothing.
            source = Path(source_dir) / rel if source_dir is not None else None
            if source is not None and p.is_file() and source.is_file() and filecmp.cmp(p, source, shallow=False):
                continue
            foreign.append(str(rel))
        return foreign

    def check_free_space(self, needed: int) -> None:
        """Refuse before anything is written when the file system holds less room than the shards still to
        write: a disk found full mid-run costs the run, and a copy into a mapping (writer.py, on tmpfs)
        would end in SIGBUS rather than an error."""
        free = shutil.disk_usage(self.dir).free
        if needed > free:
            raise OutputStateError(
                f"{self.dir}: the shards still to write take {needed / 1e9:.2f} GB and its file system has "
                f"{free / 1e9:.2f} GB free; free some space or choose another --output_dir"
            )

    def _start(self, fingerprint: dict) -> None:
        """The manifest of an unfinished run (complete: False) and the folder of per-shard records."""
        self.records_dir.mkdir(exist_ok=True)
        write_json_atomic(self.dir / MANIFEST_FILE, {"fingerprint": fingerprint, "complete": False, "shards": []})

    def record(self, rec: dict) -> None:
        write_json_atomic(self.records_dir / f"{rec['file']}.json", rec)

    def records(self) -> dict[str, dict]:
        records = (json.loads(p.read_text()) for p in self.records_dir.glob("*.json"))
        return {rec["file"]: rec for rec in records}

    def finish(self, fingerprint: dict, order: list[str]) -> list[dict]:
        recs = self.records()
        missing = [f for f in order if f not in recs]
        if missing:
            raise OutputStateError(f"{self.dir}: shards {missing[:3]} were never finished")
        shards = [recs[f] for f in order]
        write_json_atomic(self.dir / MANIFEST_FILE, {"fingerprint": fingerprint, "complete": True, "shards": shards})
        shutil.rmtree(self.records_dir, ignore_errors=True)
        return shards


def is_writable_location(path: Path) -> str | None:
    """Why ``path`` cannot be created or written, or None."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"{path}: no existing parent directory"
        probe = probe.parent
    if not probe.is_dir():
        return f"{path}: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{path}: {probe} is not writable"
    return None


def check_paths(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output directory that is, holds or sits inside the input, or that cannot be written."""
    src, dst = input_dir.resolve(), output_dir.resolve()
    if dst == src or src in dst.parents:
        raise UsageError(f"output directory {output_dir} is the input directory or inside it")
    if dst in src.parents:
        raise UsageError(f"output directory {output_dir} contains the input directory")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"output path {output_dir} exists and is not a directory")
    why = is_writable_location(dst)
    if why:
        raise UsageError(why)


def job_fingerprint(command: str, index: CheckpointIndex, options: dict, layout: list) -> dict:
    """What a convert or decompress run's output depends on (the manifest keeps it; a resumed run with another
    one is refused): tool version, command, source layout, options and the planned shards."""
    return {
        "tool_version": __version__,
        "command": command,
        "source": source_fingerprint(index),
        "options": options,
        "plan_sha256": hashlib.sha256(json.dumps(layout).encode()).hexdigest(),
    }


def quantize_fingerprint(index: CheckpointIndex, recipe: Recipe, plan: Plan) -> dict:
    """What a quantize run's output depends on: tool version, source layout, options and the planned shards
    (the manifest keeps it; a resumed run with another one is refused)."""
    layout = hashlib.sha256(json.dumps([[s.file, [t.name for t in s.outputs]] for s in plan.shards]).encode())
    return {
        "tool_version": __version__,
        "source": source_fingerprint(index),
        "options": recipe_dict(recipe),
        "plan_sha256": layout.hexdigest(),
    }


def recipe_dict(recipe: Recipe) -> dict:
    """The recipe as JSON (fingerprint and provenance)."""
    d = asdict(recipe)
    d["exclude"], d["reference_exclude"] = list(recipe.exclude), list(recipe.reference_exclude)
    d["algorithm_settings"] = dict(recipe.algorithm_settings)
    # Thousands of values on a large model: their digest changes when any of them does.
    for key in ("input_scales", "kv_scales"):
        values = getattr(recipe, key)
        d[key] = {"count": len(values), "sha256": hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()}
    return d


@contextlib.contextmanager
def single_process_job(
    output_dir: Path,
    fingerprint: dict,
    planned: dict[str, list[str]],
    *,
    resume: bool,
    verify: bool,
    overwrite: bool,
    source_dir: Path,
) -> Iterator[tuple[OutputState, dict[str, dict]]]:
    """The output directory of a one-process job (convert, decompress): locked, prepared for a fresh run or a
    resume, and yielded with the records of the shards already finished; the lock goes however the job ends.
    A state the directory cannot take raises OutputStateError; a shard left incomplete, IncompleteShardError."""
    state, lock = OutputState(output_dir), OutputDirLock(output_dir)
    try:
        lock.acquire()
        state.prepare(fingerprint, planned, resume, verify, overwrite, source_dir=source_dir)
        yield state, state.records()
    finally:
        lock.release()
