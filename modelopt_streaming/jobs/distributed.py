"""Scheduling across torchrun ranks: the process group, each rank's share of the plan, barriers that name
a rank that died or stalled, and the exchange that decides which shards are whole. Only coordination
travels between ranks (gloo: barriers and small objects); the tensors go through the shared output
directory. The runner hands in the work itself (``stream``), so this module knows ranks, not codecs."""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable

import torch

from modelopt_streaming import errors
from modelopt_streaming.errors import ModeloptStreamingError, OutputStateError, RankLostError, UsageError
from modelopt_streaming.jobs.quantize_job import QuantizeJob, shard_specs
from modelopt_streaming.plan.build import Shard, Unit, unit_sources
from modelopt_streaming.sink.output_dir import OutputState
from modelopt_streaming.sink.writer import PositionalShardWriter

__all__ = [
    "barrier",
    "check_shared_output",
    "contiguous_share",
    "init_distributed",
    "on_rank0",
    "rank_and_world",
    "world_size_env",
    "write_shards_distributed",
]

# Collectives that follow a barrier (everyone is there) and the start-up rendezvous; every wait for a
# rank's real work goes through barrier() with a timeout sized to that work instead.
GROUP_TIMEOUT_S = 600
# A rank that moves fewer bytes per second than this through its share is treated as stuck.
SLOWEST_RATE = 20e6
# Seconds a rank may lag at the end of its share beyond SLOWEST_RATE (default GROUP_TIMEOUT_S): lower it
# to learn sooner of a node that vanished without closing its connections.
RANK_SLACK_ENV = "MODELOPT_STREAMING_RANK_SLACK_S"


def rank_slack_s() -> float:
    try:
        return float(os.environ.get(RANK_SLACK_ENV, GROUP_TIMEOUT_S))
    except ValueError:
        raise UsageError(f"{RANK_SLACK_ENV}={os.environ[RANK_SLACK_ENV]!r} is not a number of seconds") from None


def init_distributed(device: str | None) -> tuple[str | None, bool]:
    """Under torchrun: one process group for coordination (gloo: only barriers and small objects travel)
    and, with CUDA, one GPU per rank by LOCAL_RANK (ranks beyond the GPU count share them round robin: the
    work is mostly moving bytes, and more ranks than GPUs can still add storage streams)."""
    if world_size_env() <= 1:
        return device, False
    import datetime

    import torch.distributed as dist

    try:
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    except (ValueError, RuntimeError) as e:  # no MASTER_ADDR, rendezvous failed or timed out
        raise UsageError(f"WORLD_SIZE={world_size_env()} but no process group could be formed: {e}") from None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto", "cuda") and torch.cuda.is_available():
        gpu = local % torch.cuda.device_count()
        device = f"cuda:{gpu}"
        torch.cuda.set_device(gpu)
    return device, True


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_share(rows: int, batch: int, rank: int, world: int) -> list[tuple[int, int]]:
    """(first row, rows) of each batch of ``batch`` rows that ``rank`` runs: batches rank, rank + world, ... of the
    rows cut in order. Whole batches, so every row meets the batch it meets in one process (a forward's bits
    depend on its batch), and in batch order, the order in which one process adds their figures."""
    return [(start, min(batch, rows - start)) for start in range(rank * batch, rows, world * batch)]


def world_size_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def on_rank0(rank: int, world: int, fn: Callable[[], None], step: str, timeout_s: float) -> None:
    """Run ``fn`` on rank 0 and raise its error, if any, on every rank (so none waits forever): rank 0 raises
    the error itself, the others an error of the same class with its message. An OSError of ``fn`` (it
    prepares the output directory) is an OutputStateError: the directory cannot be used."""
    error: ModeloptStreamingError | None = None
    if rank == 0:
        try:
            fn()
        except ModeloptStreamingError as e:
            error = e
        except OSError as e:
            error = OutputStateError(str(e))
    if world > 1:
        import torch.distributed as dist

        barrier(rank, world, step, timeout_s)
        box = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(box, src=0)
        if rank != 0 and box[0] is not None:
            name, message = box[0]
            error = getattr(errors, name, OutputStateError)(message)
    if error is not None:
        raise error


def barrier(rank: int, world: int, step: str, timeout_s: float) -> None:
    """A barrier that names the rank that never arrives. Every rank reports to rank 0 over its own
    connection, so a rank that died (its connection closes at once) or stalls past ``timeout_s`` is
    known by number; rank 0 then tells the others which ranks were lost. torch's monitored_barrier
    would only say "connection closed by peer [address]" on rank 0 for a dead rank."""
    if world <= 1:
        return
    import datetime

    import torch.distributed as dist

    def failure(e: RuntimeError) -> str:
        return "timed out" if "imed out" in str(e) else "stopped"

    why = {}
    if rank == 0:
        deadline = time.monotonic() + timeout_s  # one deadline for all ranks, not timeout_s each
        for r in range(1, world):
            left = datetime.timedelta(seconds=max(1.0, deadline - time.monotonic()))
            try:
                dist.irecv(torch.zeros(1), src=r).wait(timeout=left)
            except RuntimeError as e:
                why[r] = failure(e)
        verdict = torch.zeros(world)
        for r in why:
            verdict[r] = 1
        for r in range(1, world):
            if r not in why:
                with contextlib.suppress(RuntimeError):  # a rank that cannot be told finds out itself
                    dist.send(verdict, dst=r)
        lost = sorted(why)
    else:
        verdict = torch.zeros(world)
        try:
            dist.send(torch.zeros(1), dst=0)
            # Rank 0 may wait up to timeout_s for the slowest rank before it answers.
            dist.irecv(verdict, src=0).wait(timeout=datetime.timedelta(seconds=2 * timeout_s + 60))
        except RuntimeError as e:
            why[0] = failure(e)
        lost = sorted(why) or [r for r in range(world) if verdict[r]]
    if lost:
        names = ", ".join(f"rank {r}" for r in lost)
        stalled = any(v == "timed out" for v in why.values())
        raise RankLostError(
            f"{names} {'did not reach' if stalled else 'stopped before'} the '{step}' step"
            + (f" within {timeout_s:.0f} s" if stalled else " (its process died or failed: see its own error)")
            + "; finished shards are kept: rerun with --resume"
        )


def check_shared_output(state: OutputState, rank: int, world: int) -> None:
    """Every rank must see the files rank 0 writes (ranks write one another's shards): on several nodes
    that needs a shared file system. Checked with a token file before any work."""
    if world <= 1:
        return
    import secrets
    import socket

    import torch.distributed as dist

    token_file = state.records_dir / "shared_output_check"
    box = [None]
    if rank == 0:
        box = [secrets.token_hex(16)]
        token_file.write_text(box[0])
    barrier(rank, world, "shared output check", GROUP_TIMEOUT_S)
    dist.broadcast_object_list(box, src=0)
    try:
        seen = token_file.read_text() == box[0]
    except OSError:
        seen = False
    views = [None] * world
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if rank == 0:
        token_file.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise UsageError(
            f"{', '.join(blind)} cannot see the files rank 0 writes in {state.dir} (host {views[0][1]}): "
            "with several nodes the output directory must be on a file system they all share"
        )


_DIGEST_RECORD = struct.Struct("<I32s")  # a tensor's index in its shard, its sha256


def _pack_digests(names: list[str], digests: dict[str, bytes]) -> bytes:
    """The tensor digests one rank computed for one shard, as (index, sha256) records: 36 bytes a tensor, so a
    DeepSeek-sized plan sends a few MB to rank 0 in all, not names."""
    return b"".join(_DIGEST_RECORD.pack(j, digests[n]) for j, n in enumerate(names) if n in digests)


def _unpack_digests(names: list[str], blob: bytes, into: dict[str, bytes]) -> None:
    for j, digest in _DIGEST_RECORD.iter_unpack(blob):
        into[names[j]] = digest


def contiguous_share(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """This rank's run of consecutive units, balanced by source bytes: each rank reads one region of the
    input front to back, which disks prefer to interleaved reads."""
    sizes = [sum(src.nbytes for src in unit_sources(u)) for u in units]
    total = sum(sizes) or 1
    lo, hi = total * rank / world, total * (rank + 1) / world
    out, pos = [], 0
    for unit, size in zip(units, sizes):
        middle = pos + size / 2
        if lo <= middle < hi or (rank == world - 1 and middle >= hi):
            out.append(unit)
        pos += size
    return out


def write_shards_distributed(
    job: QuantizeJob,
    todo: list[Shard],
    stream: Callable[[list[Unit], Callable[[Unit], PositionalShardWriter]], None],
    before: Callable[[Callable[[Unit], PositionalShardWriter]], set[int]] | None = None,
) -> None:
    """torchrun: rank 0 lays out every unfinished shard at its final size; each rank writes its share of
    the units at their planned offsets, digesting each tensor as it writes it, so the work splits evenly
    whatever the shard count; then rank 0 gathers the tensor digests and renames and records each shard whose
    tensors were all written. No output byte is read back. The bytes are those of a single process.

    ``stream(units, sink_of)`` reads, encodes and writes ``units`` into ``sink_of(unit)``; the seconds of each
    step go to ``job.summary.phases``, and a finished shard's record is ``job.finished_record`` of it given
    every rank's exact reciprocals.

    ``before(sink_of)`` runs first on every rank with the same writers and returns the ids of the units this
    rank wrote (a GPTQ calibration writes each layer's units); the units no rank wrote are then shared."""
    import torch.distributed as dist

    state, rank, world, phases = job.state, job.rank, job.world, job.summary.phases
    specs = {shard.file: shard_specs(shard) for shard in todo}
    clock = [time.perf_counter()]

    def lap(step: str) -> None:
        now = time.perf_counter()
        phases[step] = now - clock[0]
        clock[0] = now

    if rank == 0:
        for shard in todo:
            PositionalShardWriter.create(state.dir, shard.file, specs[shard.file])
    barrier(rank, world, "lay out shards", GROUP_TIMEOUT_S)
    lap("lay out shards")
    writers = {shard.file: PositionalShardWriter(state.dir, shard.file, specs[shard.file]) for shard in todo}
    shard_of = {id(u): shard.file for shard in todo for u in shard.units}
    units = [u for shard in todo for u in shard.units]
    if before is not None:
        try:
            written = before(lambda unit: writers[shard_of[id(unit)]])
        except BaseException:
            for w in writers.values():
                w.close()
            raise
        position = {id(u): i for i, u in enumerate(units)}
        parts: list = [None] * world
        dist.all_gather_object(parts, sorted(position[w] for w in written if w in position))
        done = {i for part in parts for i in part}
        units = [u for i, u in enumerate(units) if i not in done]
        lap("calibrate and write")
    mine = contiguous_share(units, rank, world)
    job.meter.set_total(sum(sum(src.nbytes for src in unit_sources(u)) for u in mine))
    try:
        stream(mine, lambda unit: writers[shard_of[id(unit)]])
    finally:
        for w in writers.values():
            w.close()
    lap("stream")
    # The slowest rank's share bounds the wait (shares are balanced by bytes, so this is generous).
    largest = max(
        sum(sum(s.nbytes for s in unit_sources(u)) for u in contiguous_share(units, r, world)) for r in range(world)
    )
    barrier(rank, world, "write shares", rank_slack_s() + largest / SLOWEST_RATE)
    lap("wait for ranks")
    # What every rank completed, as the digests of the tensors it wrote whole: a shard is renamed only when
    # its tensors were all written, and its digest is derived from theirs.
    names = {f: [t.name for t in w.tensors] for f, w in writers.items()}
    mine_done = {f: _pack_digests(names[f], w.digests()) for f, w in writers.items()}
    everyone: list | None = [None] * world if rank == 0 else None
    dist.gather_object((mine_done, job.reciprocals.record), everyone, dst=0)
    if rank == 0:
        records = {k: v for _, theirs in everyone for k, v in theirs.items()}
        for shard in todo:
            digests: dict[str, bytes] = {}
            for done, _ in everyone:
                _unpack_digests(names[shard.file], done[shard.file], digests)
            state.record(job.finished_record(writers[shard.file].finish(digests), records))
    barrier(rank, world, "rename shards", rank_slack_s())
    lap("gather digests and rename")
