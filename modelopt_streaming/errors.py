"""Every error the tool reports on purpose, under one base class, beside the stream: each stage raises the one
that names what went wrong, and nothing re-wraps it on the way up. The CLI turns a class into an exit code
through one table (``cli.EXIT_CODES``); anything else is a bug and is reported as one."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConsumerError",
    "ConversionRefused",
    "IncompleteShardError",
    "ModeloptStreamingError",
    "OutputError",
    "OutputStateError",
    "PartlyExcludedFusedLayer",
    "RankLostError",
    "UsageError",
]


class ModeloptStreamingError(Exception):
    """Base of every error the tool raises on purpose; its message is one line that names the file, tensor
    or option at fault."""


class UsageError(ModeloptStreamingError):
    """The command cannot run as asked (paths, options); nothing was written."""


class CheckpointError(ModeloptStreamingError):
    """A checkpoint that cannot be read as it claims; the message names file and tensor."""


class ConsumerError(ModeloptStreamingError, ValueError):
    """A checkpoint whose exclusions vLLM cannot read the way the tensors need."""


class PartlyExcludedFusedLayer(ConsumerError):
    """vLLM raises 'Detected some but not all shards of ... are quantized' and refuses to load."""


class OutputStateError(ModeloptStreamingError):
    """The output directory cannot be used as asked; the message says why and what to do."""


class OutputError(ModeloptStreamingError):
    """Writing the output failed (disk full, I/O error); finished shards are kept for --resume."""


class IncompleteShardError(OutputError):
    """A shard is about to be renamed while some of its planned bytes were never written."""


class RankLostError(OutputError):
    """A torchrun rank died, failed or stalled; the message names it. Finished shards are kept."""


class ConversionRefused(ModeloptStreamingError):
    """The checkpoint cannot be converted exactly as asked; nothing was written."""
