"""One process writing its shards one after another (convert, decompress): each output tensor is either made
whole by the job or a source tensor's bytes copied unchanged in bounded chunks, so memory stays constant
whatever the tensor's size; a shard is recorded when whole, and its partial file removed on any error."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from modelopt_streaming.sink.output_dir import OutputState
from modelopt_streaming.sink.writer import ShardWriter
from modelopt_streaming.source.index import TensorInfo, TensorSpec
from modelopt_streaming.source.reader import TensorReader

__all__ = ["COPY_CHUNK_BYTES", "write_shards_in_order"]

# Bytes of one read of a tensor copied unchanged.
COPY_CHUNK_BYTES = 16 * 1024 * 1024


class _Planned(Protocol):
    @property
    def spec(self) -> TensorSpec: ...


T = TypeVar("T", bound=_Planned)


def write_shards_in_order(
    input_dir: Path,
    state: OutputState,
    shards: Iterable[tuple[str, list[T]]],
    content: Callable[[T, TensorReader], torch.Tensor | TensorInfo],
) -> None:
    """Write each ``(file, outputs)`` shard in order into ``state``'s directory and record it. ``content(output,
    reader)`` gives an output's tensor, or the source tensor whose bytes it is."""
    with TensorReader(input_dir) as reader:
        for file, outputs in shards:
            writer = ShardWriter(state.dir, file, [o.spec for o in outputs])
            try:
                for output in outputs:
                    data = content(output, reader)
                    if isinstance(data, torch.Tensor):
                        writer.write(output.spec.name, data)
                        continue
                    writer.begin(output.spec.name)
                    for offset in range(0, data.nbytes, COPY_CHUNK_BYTES):
                        writer.write_bytes(reader.read_chunk(data, offset, min(COPY_CHUNK_BYTES, data.nbytes - offset)))
                state.record(writer.close())
            except BaseException:
                writer.abort()
                raise
