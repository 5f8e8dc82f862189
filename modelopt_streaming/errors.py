"""The errors a run reports to its caller besides a bad checkpoint (``index.CheckpointError``): raised by
every stage that checks options, paths or the output, so they live beside the stream, not in one stage."""


class UsageError(Exception):
    """The command cannot run as asked (paths, options); nothing was written."""


class OutputError(Exception):
    """Writing the output failed (disk full, I/O error); finished shards are kept for --resume."""
