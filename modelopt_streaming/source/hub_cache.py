"""Checkpoints named by Hugging Face Hub id, found in the local cache; nothing is ever downloaded."""

from __future__ import annotations

import os
from pathlib import Path

from modelopt_streaming.errors import CheckpointError

__all__ = ["resolve_checkpoint_dir"]


# Where huggingface_hub keeps downloaded repositories (its documented cache layout, read offline only):
# <cache>/models--<org>--<name>/{refs/<ref>, snapshots/<commit>/<files>}.
def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hub"


def resolve_checkpoint_dir(spec: str | os.PathLike) -> Path:
    """A checkpoint directory, or a Hub id (``org/name`` or ``org/name@revision``) already in the local cache.

    Args:
        spec: a path, or a Hub id with an optional ``@revision`` (a branch, tag or commit; default ``main``).

    Returns:
        The path itself when it exists or does not look like a Hub id; else the cached snapshot directory.

    Raises:
        CheckpointError: a Hub id that is not in the local cache; the message says how to fetch it.
    """
    path = Path(spec)
    text = os.fspath(spec)
    if path.exists() or os.path.isabs(text) or text.startswith(".") or text.count("/") != 1:
        return path
    repo, _, revision = text.partition("@")
    org, name = repo.split("/")
    if not org or not name:
        return path
    cache = _hub_cache_dir() / f"models--{org}--{name}"
    revision = revision or "main"
    ref = cache / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = cache / "snapshots" / commit
    if not snapshot.is_dir():
        raise CheckpointError(
            f"{text}: not a directory, and not in the local Hugging Face cache ({cache}, revision {revision}); "
            f"this tool never downloads: fetch it first (e.g. `huggingface-cli download {repo}`)"
        )
    return snapshot
