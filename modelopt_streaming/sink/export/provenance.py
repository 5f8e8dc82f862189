"""``modelopt_streaming.json``: how an output directory was made, one builder for every job. Each job adds its
own keys; the common ones come in one order, so the same job writes the same bytes."""

from __future__ import annotations

from modelopt_streaming.sink.writer import DIGEST_SCHEME
from modelopt_streaming.version import __version__

__all__ = ["provenance"]


def provenance(
    *,
    command: str | None,
    options: dict,
    source: dict,
    side_files: list[str],
    shards: list[dict],
    details: dict | None = None,
    trailer: dict | None = None,
) -> dict:
    """The provenance record: tool and version, ``command`` (left out when None: quantize's record has never
    named it), the options, the ``source`` description, the job's ``details``, the side files copied, each
    shard's file, size and digest (from the shard records the output state kept) and then ``trailer``."""
    return {
        "tool": "modelopt-streaming",
        "version": __version__,
        **({"command": command} if command is not None else {}),
        "options": options,
        "source": source,
        **(details or {}),
        "side_files": side_files,
        "shards": [{k: r[k] for k in ("file", "size", "digest")} for r in shards],
        "shard_digest": DIGEST_SCHEME,
        **(trailer or {}),
    }
