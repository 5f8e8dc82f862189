"""The output directory's state: what is finished, provably, so that a run can resume exactly.

Each finished shard gets a record (tensors, byte size, sha256) written atomically after the shard's
rename; the manifest holds the fingerprint of the source and of the options. A resumed run keeps only
shards whose record and file agree, removes partial and unknown files, and refuses when the source or
the options changed. Knows files and records, nothing of quantization.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .writer import MANIFEST_FILE, write_json_atomic

RECORDS_DIR = ".modelopt_streaming"
# Written last by a finished run; its absence marks an unfinished output directory.
FINISHED_MARKER = "hf_quant_config.json"


class OutputStateError(Exception):
    """The output directory cannot be used as asked; the message says why and what to do."""


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


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


class OutputState:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.records_dir = self.dir / RECORDS_DIR

    def prepare(
        self, fingerprint: dict, planned: dict[str, list[str]], resume: bool, verify: bool, overwrite: bool
    ) -> dict[str, dict]:
        """Make the directory ready; returns the records of shards already finished (resume only)."""
        if self.dir.exists() and any(self.dir.iterdir()):
            if overwrite and not resume:
                shutil.rmtree(self.dir)
            elif not resume:
                raise OutputStateError(
                    f"output directory {self.dir} is not empty (use --resume to continue an "
                    "interrupted run, or --overwrite to replace it)"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest_path = self.dir / MANIFEST_FILE
        if not manifest_path.exists():
            if any(p.name != RECORDS_DIR for p in self.dir.iterdir()):
                raise OutputStateError(
                    f"{self.dir} holds files but no {MANIFEST_FILE}: it is not a "
                    "modelopt-streaming output; use --overwrite to replace it"
                )
            self._start(fingerprint)
            return {}
        manifest = json.loads(manifest_path.read_text())
        changed = _differences(manifest.get("fingerprint", {}), fingerprint)
        if changed:
            raise OutputStateError(
                f"cannot resume into {self.dir}: the source or options changed since that run "
                f"({', '.join(changed[:4])}); use --overwrite to start over"
            )
        # An unfinished directory must never look finished, even if this run dies too.
        (self.dir / FINISHED_MARKER).unlink(missing_ok=True)
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
                and (not verify or sha256_file(path) == rec.get("sha256"))
            )
            if ok:
                done[name] = rec
        for p in self.dir.iterdir():
            stale = p.name.endswith(".partial") or (p.suffix == ".safetensors" and p.name not in done)
            if stale:
                p.unlink()
        self._start(fingerprint)
        for rec in done.values():
            self.record(rec)
        return done

    def _start(self, fingerprint: dict) -> None:
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
