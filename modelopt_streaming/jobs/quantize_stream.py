"""The streaming half of a quantize run: the plan's units read with a bounded read-ahead, encoded by the
codec and written at their planned offsets by writer threads, in lanes that keep several shards in flight;
the one-process shard writing (torchrun's is in ``distributed``). Memory is bounded by the largest unit plus
the read-ahead and write-ahead budgets below."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from modelopt_streaming import faults
from modelopt_streaming.codec import Codec, nvfp4
from modelopt_streaming.errors import CheckpointError, IncompleteShardError
from modelopt_streaming.formats.interchange import COMPRESSED_TENSORS, EXPERTS_3D_SUFFIXES, LEAVES, ExactReciprocals
from modelopt_streaming.jobs.distributed import contiguous_share
from modelopt_streaming.jobs.pipeline import ParallelWriter, read_ahead
from modelopt_streaming.jobs.quantize_job import QuantizeJob, shard_specs
from modelopt_streaming.jobs.shard_copy import COPY_CHUNK_BYTES
from modelopt_streaming.plan.build import CopyUnit, QuantizeUnit, Recipe, ScalarUnit, Shard, Unit, unit_sources
from modelopt_streaming.sink.writer import PositionalShardWriter
from modelopt_streaming.source.vendor import DecodedWeight, read_source

__all__ = [
    "READ_AHEAD_BYTES",
    "READ_AHEAD_GPU_BYTES",
    "WRITE_AHEAD_BYTES",
    "interleave_lanes",
    "stream_units",
    "write_shards_local",
]

# Source bytes read ahead of the codec: a dense DeepSeek-V3 gate/up group (528 MB) and the weight after
# it fit, and peak memory stays under 1.5 GB; a group larger than this still runs, one at a time.
READ_AHEAD_BYTES = 640 * 1024 * 1024
# On a GPU a unit to quantize waits in GPU memory (the reader copies it there through page-locked pieces), so
# it is held to this much GPU memory instead: a dense layer's 504 MB group no longer leaves the next one
# unread, while host memory still holds only the copies' chunks and the pieces in flight.
READ_AHEAD_GPU_BYTES = 2 * 1024 * 1024 * 1024
# Encoded bytes queued for the writer threads (or one tensor alone, when larger).
WRITE_AHEAD_BYTES = 256 * 1024 * 1024


def _encode_unit(
    unit: QuantizeUnit,
    members: list[torch.Tensor],
    codec: Codec,
    recipe: Recipe,
    allow_nonfinite: bool,
    root: Path,
    reciprocals: ExactReciprocals | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """The output tensors of one unit, in the plan's order; the group shares one weight_scale_2."""
    amaxes = torch.stack([codec.tensor_amax(w).float() for w in members]).cpu()  # one device sync a unit
    for src, w, amax in zip(unit.sources, members, amaxes):
        if not torch.isfinite(amax) and not allow_nonfinite:
            bad = int((~torch.isfinite(w)).sum())
            raise CheckpointError(
                f"{root / src.file}, tensor {src.name!r}: {bad} NaN/Inf values in a weight to be "
                "quantized (use --allow_nonfinite to quantize it anyway)"
            )
    weight_scale_2 = nvfp4.weight_scale_2_from_amax(amaxes.max(), recipe.scale_math)
    # A reference checkpoint's input scales (--input_scales_from): a fused group takes the largest of its
    # members', as ModelOpt's export unifies them; a module the reference lacks keeps 1.0.
    known = [recipe.input_scale_of[m] for m in unit.modules if m in recipe.input_scale_of]
    input_scale = torch.tensor(max(known) if known else 1.0, dtype=torch.float32)
    out = []
    if unit.layout == "experts_3d":
        (name,), (w,) = unit.modules, members
        packed, block_scales = nvfp4.quantize_experts(w, weight_scale_2, codec.quantize)
        out += [(name, packed), (name + EXPERTS_3D_SUFFIXES["weight_scale"], block_scales)]
        out.append((name + EXPERTS_3D_SUFFIXES["global"], weight_scale_2))
        if unit.with_input_scale:
            out.append((name + EXPERTS_3D_SUFFIXES["input"], input_scale))
        return _to_host(out)
    leaf = LEAVES[unit.dialect]
    for module, w in zip(unit.modules, members):
        packed, block_scales = codec.quantize(w, weight_scale_2)
        global_scale, member_input_scale = weight_scale_2, input_scale
        if unit.dialect == COMPRESSED_TENSORS:
            # Divisors, float32 [1] (spec section 5); the values they do not invert back to are remembered
            # (interchange.ExactReciprocals) so that convert --to modelopt gives ModelOpt's bytes.
            reciprocals = reciprocals if reciprocals is not None else ExactReciprocals()
            global_scale = _divisor(reciprocals, weight_scale_2, f"{module}.{leaf['global']}")
            if unit.with_input_scale:
                member_input_scale = _divisor(reciprocals, input_scale, f"{module}.{leaf['input']}")
        out.append((f"{module}.{leaf['weight']}", packed))
        out.append((f"{module}.{leaf['weight_scale']}", block_scales))
        out.append((f"{module}.{leaf['global']}", global_scale))
        if unit.with_input_scale:
            out.append((f"{module}.{leaf['input']}", member_input_scale))
    return _to_host(out)


def _to_host(out: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """A unit's GPU results copied into page-locked memory, all copies queued and waited for once: they run
    at the link's speed, and the caching host allocator hands the same pages back for the next unit where
    pageable memory would be faulted in afresh."""
    on_gpu = [t for _, t in out if t.device.type == "cuda"]
    if not on_gpu:
        return out
    host = []
    for name, t in out:
        if t.device.type == "cuda":
            pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            pinned.copy_(t, non_blocking=True)
            t = pinned
        host.append((name, t))
    torch.cuda.current_stream(on_gpu[0].device).synchronize()
    return host


def _divisor(reciprocals: ExactReciprocals, scale: torch.Tensor, name: str) -> torch.Tensor:
    """compressed-tensors' float32 [1] divisor for a ModelOpt scale (its correctly rounded reciprocal)."""
    return torch.tensor([reciprocals.convert("", float(scale), name)], dtype=torch.float32)


def _unit_reads(units: list[Unit]) -> list[tuple[Unit, int, int]]:
    """What to read, in order: quantize units and decoded weights whole, plain copies in bounded chunks."""
    items = []
    for unit in units:
        if isinstance(unit, ScalarUnit):
            items.append((unit, 0, 0))
        elif isinstance(unit, CopyUnit) and not isinstance(unit.source, DecodedWeight):
            n = unit.source.nbytes
            items += [(unit, off, min(COPY_CHUNK_BYTES, n - off)) for off in range(0, n, COPY_CHUNK_BYTES)]
            if n == 0:
                items.append((unit, 0, 0))
        else:
            items.append((unit, 0, sum(s.nbytes for s in unit_sources(unit))))
    return items


def interleave_lanes(units: list[Unit], lanes: int) -> list[tuple[int, Unit]]:
    """``units`` cut into ``lanes`` consecutive runs balanced by bytes, then merged as ``(lane, unit)``, the
    lane with the fewest bytes handed out going next. Buffered writes into one file are serialized by the
    file system (the inode lock of ext4, XFS and tmpfs), so writer threads only add speed when they write
    different shards: the lanes put ``lanes`` shards in flight at once. A crash leaves at most ``lanes``
    partial shards."""
    runs = [contiguous_share(units, i, lanes) for i in range(lanes)]
    runs = [r for r in runs if r]
    size = {id(u): sum(s.nbytes for s in unit_sources(u)) for u in units}
    heads, done, out = [0] * len(runs), [0] * len(runs), []
    while len(out) < len(units):
        i = min((k for k in range(len(runs)) if heads[k] < len(runs[k])), key=done.__getitem__)
        unit = runs[i][heads[i]]
        out.append((i, unit))
        heads[i] += 1
        done[i] += size[id(unit)]
    return out


def _read_ahead_cost(device: torch.device):
    """The read-ahead's measure of an item, in bytes of READ_AHEAD_BYTES: what it holds in host memory (its
    bytes, plus the bf16 tensor a decoded source becomes); a unit read straight to the GPU scaled so that
    READ_AHEAD_GPU_BYTES of them fill the budget."""

    def cost(item: tuple[Unit, int, int]) -> int:
        unit, _offset, nbytes = item
        decoded = [s for s in unit_sources(unit) if isinstance(s, DecodedWeight)]
        if device.type == "cuda" and isinstance(unit, QuantizeUnit) and not decoded:
            return max(1, nbytes * READ_AHEAD_BYTES // READ_AHEAD_GPU_BYTES)
        return nbytes + sum(2 * d.numel for d in decoded)

    return cost


def stream_units(job: QuantizeJob, units: list[Unit], sink_of: Callable[[Unit], PositionalShardWriter]) -> None:
    """Read, encode and hand to ``sink_of(unit)`` every one of ``units``, with reading (on ``job.threads``
    threads), computing and writing (on as many threads) overlapped. Needs ``job.reader``, ``job.codec`` and
    ``job.meter``."""
    reader, device, codec, meter, stats, threads = job.reader, job.device, job.codec, job.meter, job.stats, job.threads
    background = ParallelWriter(stats, threads, WRITE_AHEAD_BYTES)
    copying: dict[int, object] = {}  # a copied tensor's writer, from its first chunk to its last
    lanes = interleave_lanes(units, threads)
    lane_of = {id(u): lane for lane, u in lanes}
    units = [u for _, u in lanes]

    def load(item: tuple[Unit, int, int]):
        unit, offset, nbytes = item
        if isinstance(unit, ScalarUnit):
            value = job.recipe.kv_scale_of.get(unit.name)
            if value is None:
                raise CheckpointError(f"{reader.root}: the calibration measured no value for {unit.name}")
            return torch.tensor(value, dtype=torch.float32)
        if isinstance(unit, CopyUnit):
            if isinstance(unit.source, DecodedWeight):
                return read_source(reader, unit.source)
            return reader.read_chunk(unit.source, offset, nbytes)
        if device.type != "cuda":
            return [read_source(reader, src) for src in unit.sources]
        # Straight to the GPU on a side stream (one per reader thread), while the codec works on the
        # previous unit.
        stream = _copy_stream(device)
        members = [read_source(reader, src, device=device, stream=stream) for src in unit.sources]
        stream.synchronize()
        return members

    try:
        for (unit, offset, nbytes), data in read_ahead(
            _unit_reads(units), load, _read_ahead_cost(device), READ_AHEAD_BYTES, stats, workers=threads
        ):
            sink, lane = sink_of(unit), lane_of[id(unit)]
            faults.point("unit")  # after the unit's shard is laid out: a pause here falls inside a shard
            if isinstance(unit, ScalarUnit):
                background.submit(sink.write, unit.name, data, nbytes=4)
                continue
            if isinstance(unit, CopyUnit) and isinstance(unit.source, DecodedWeight):
                background.submit(sink.write, unit.source.name, data, nbytes=data.numel() * data.element_size())
                meter.advance(nbytes, stats)
                continue
            if isinstance(unit, CopyUnit):
                if offset == 0:
                    copying[id(unit)] = sink.open(unit.source.name)
                tensor_write = copying[id(unit)]
                if offset + nbytes >= unit.source.nbytes:
                    del copying[id(unit)]
                if nbytes:
                    # The pieces of one tensor in order, on its lane's thread.
                    background.submit(tensor_write.write_bytes, data, nbytes=nbytes, lane=lane)
                meter.advance(nbytes, stats)
                continue
            t = time.perf_counter()
            if device.type == "cuda":
                for member in data:  # made on the copy stream, used and freed on this one
                    member.record_stream(torch.cuda.current_stream(device))
            encoded = _encode_unit(
                unit, data, codec, job.recipe, job.options.allow_nonfinite, reader.root, job.reciprocals
            )
            del data
            stats.compute_s += time.perf_counter() - t
            # Whole tensors go to whichever writer thread has the least queued: a dense layer's 66 MB packed
            # weights would otherwise wait behind each other on their lane's thread while the others idle.
            for name, tensor in encoded:
                background.submit(sink.write, name, tensor, nbytes=tensor.numel() * tensor.element_size())
            meter.advance(nbytes, stats)
        background.close()
    except BaseException:
        with contextlib.suppress(BaseException):  # the first error is the one to report
            background.close()
        raise


def write_shards_local(
    job: QuantizeJob,
    todo: list[Shard],
    before: Callable[[Callable[[Unit], PositionalShardWriter]], set[int]] | None = None,
) -> None:
    """One process: each shard laid out when its first unit comes, its tensors written at their offsets by
    the writer threads (each digested by the thread that writes it), and the shard renamed and recorded by
    the thread that completes it, while the next shard's units stream on. On an error or a signal the
    unfinished shards' partial files are removed; the finished ones stay for --resume.

    ``before(sink_of)`` runs first with the same shard writers and returns the ids of the units it wrote (a
    calibration writes each layer's units from the tensors it already holds); the stream writes the rest."""
    state = job.state
    writers: dict[str, PositionalShardWriter] = {}
    shard_of = {id(u): shard for shard in todo for u in shard.units}

    def finished(writer: PositionalShardWriter) -> None:
        state.record(job.finished_record(writer.finish()))

    def sink_of(unit: Unit) -> PositionalShardWriter:
        shard = shard_of[id(unit)]
        if shard.file not in writers:
            PositionalShardWriter.create(state.dir, shard.file, shard_specs(shard))
            writers[shard.file] = PositionalShardWriter(state.dir, shard.file, shard_specs(shard), on_whole=finished)
        return writers[shard.file]

    try:
        written = before(sink_of) if before is not None else set()
        stream_units(job, [u for shard in todo for u in shard.units if id(u) not in written], sink_of)
        unfinished = [shard.file for shard in todo if not (state.dir / shard.file).exists()]
        if unfinished:
            raise IncompleteShardError(f"{state.dir}: shards {unfinished[:3]} were not completed; rerun with --resume")
    except BaseException:
        for f, w in writers.items():
            if not (state.dir / f).exists():
                w.abort()
        raise


class LiveUnits:
    """The units of ``todo`` that a calibration's live modules hold every source tensor of, quantized and
    written while the module is on the device (``engine.calibrate``'s ``on_live``): the bytes the stream
    would write, from tensors read once. A unit's input scales are final when its layer has run (every module
    belongs to one layer), so each is encoded with the calibration's values so far."""

    def __init__(self, job: QuantizeJob, todo: list[Shard], sink_of: Callable[[Unit], PositionalShardWriter]):
        self.job, self.sink_of = job, sink_of
        self.todo = [u for shard in todo for u in shard.units if not isinstance(u, ScalarUnit)]
        # Under torchrun (a GPTQ run, where every rank runs every layer) each rank writes every world-th unit.
        self.units = self.todo[job.rank :: job.world]
        self.written: set[int] = set()
        self.writer = ParallelWriter(job.stats, job.threads, WRITE_AHEAD_BYTES)

    def __call__(self, module: str, views: dict[str, torch.Tensor], input_scales: dict[str, float]) -> None:
        job = self.job
        recipe = dataclasses.replace(job.recipe, input_scales=tuple(sorted(input_scales.items())))
        for unit in self.units:
            sources = unit_sources(unit)
            if id(unit) in self.written or not all(s.name in views for s in sources):
                continue
            if isinstance(unit, QuantizeUnit):
                members = [views[s.name].to(job.device) for s in sources]  # experts may wait in host memory
                t = time.perf_counter()
                encoded = _encode_unit(
                    unit, members, job.codec, recipe, job.options.allow_nonfinite, job.input_dir, job.reciprocals
                )
                job.stats.compute_s += time.perf_counter() - t
            else:
                encoded = [(unit.source.name, views[unit.source.name].contiguous().cpu())]
            self.write(unit, encoded)

    def write(self, unit: Unit, encoded: list[tuple[str, torch.Tensor]]) -> None:
        """Hand a unit's output tensors to the writer threads; the stream will not write it again."""
        sink = self.sink_of(unit)
        for name, tensor in encoded:
            self.writer.submit(sink.write, name, tensor, nbytes=tensor.numel() * tensor.element_size())
        self.written.add(id(unit))
        self.job.meter.advance(sum(s.nbytes for s in unit_sources(unit)), self.job.stats)

    def close(self) -> None:
        self.writer.close()


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    key = (device, threading.get_ident())
    if key not in _COPY_STREAMS:
        _COPY_STREAMS[key] = torch.cuda.Stream(device=device)
    return _COPY_STREAMS[key]
