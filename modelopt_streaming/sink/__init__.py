"""Sink: the output directory (shards written at their offsets, resume state, lock) and the exported configs."""
