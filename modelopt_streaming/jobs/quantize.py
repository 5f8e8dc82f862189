"""Runner: composes index -> plan -> reader -> codec -> writer -> export for one quantize job: checks the
options, reads, encodes and writes the plan's units with reading, computing and writing overlapped, and
hands the scheduling across torchrun ranks to ``distributed``."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import torch

from modelopt_streaming import faults
from modelopt_streaming.codec import Codec, cpu_kernel, nvfp4, select_codec
from modelopt_streaming.consumers.vllm import family_of, load_reference_exclusions
from modelopt_streaming.errors import CheckpointError, IncompleteShardError, OutputError, UsageError
from modelopt_streaming.formats.interchange import COMPRESSED_TENSORS, FORMATS, LEAVES, RECORD_KEY, ExactReciprocals
from modelopt_streaming.jobs.distributed import (
    GROUP_TIMEOUT_S,
    SLOWEST_RATE,
    barrier,
    check_shared_output,
    contiguous_share,
    init_distributed,  # noqa: F401 - public here: quantize's WORLD_SIZE error tells callers to use it
    on_rank0,
    rank_and_world,
    world_size_env,
    write_shards_distributed,
)
from modelopt_streaming.jobs.pipeline import ParallelWriter, Throughput, map_large_buffers, read_ahead
from modelopt_streaming.jobs.progress import Progress
from modelopt_streaming.jobs.quantize_export import export_checkpoint
from modelopt_streaming.jobs.summary import Summary, summarize
from modelopt_streaming.plan.build import CopyUnit, Plan, QuantizeUnit, Recipe, Shard, Unit, build_plan, unit_sources
from modelopt_streaming.sink.export import compact_exclusions
from modelopt_streaming.sink.export.compressed_tensors_format import compressed_tensors_ignore
from modelopt_streaming.sink.output_dir import OutputDirLock, OutputState, check_paths, quantize_fingerprint
from modelopt_streaming.sink.writer import PositionalShardWriter
from modelopt_streaming.source.hub_cache import resolve_checkpoint_dir
from modelopt_streaming.source.index import CheckpointIndex, TensorSpec, build_index
from modelopt_streaming.source.quantized import reference_input_scales
from modelopt_streaming.source.reader import TensorReader
from modelopt_streaming.source.vendor import DecodedWeight, read_source


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return dev


# Source bytes read ahead of the codec: a dense DeepSeek-V3 gate/up group (528 MB) and the weight after
# it fit, and peak memory stays under 1.5 GB; a group larger than this still runs, one at a time.
READ_AHEAD_BYTES = 640 * 1024 * 1024
# On a GPU a unit to quantize waits in GPU memory (the reader copies it there through page-locked pieces), so
# it is held to this much GPU memory instead: a dense layer's 504 MB group no longer leaves the next one
# unread, while host memory still holds only the copies' chunks and the pieces in flight.
READ_AHEAD_GPU_BYTES = 2 * 1024 * 1024 * 1024
# Encoded bytes queued for the writer threads (or one tensor alone, when larger).
WRITE_AHEAD_BYTES = 256 * 1024 * 1024
COPY_CHUNK_BYTES = 16 * 1024 * 1024


def resolve_io_threads(requested: int | None = None) -> int:
    """Reader threads, and as many writer threads, of one process: the CPUs it may use shared among the
    processes of this node (torchrun's LOCAL_WORLD_SIZE), two to eight. One stream of a kernel copy is
    what a single thread moves; RAID, tmpfs and parallel file systems serve several."""
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--io_threads must be at least 1, not {requested}")
        return requested
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(2, min(8, len(os.sched_getaffinity(0)) // (2 * local)))


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
        out += [(name, packed), (f"{name}_weight_scale", block_scales)]
        out.append((f"{name}_weight_scale_2", weight_scale_2))
        if unit.with_input_scale:
            out.append((f"{name}_input_scale", input_scale))
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


# Collectives that follow a _checkpoint (everyone is there) and the start-up rendezvous; every wait for a
# rank's real work goes through _checkpoint with a timeout sized to that work instead.
def _unit_reads(units: list[Unit]) -> list[tuple[Unit, int, int]]:
    """What to read, in order: quantize units and decoded weights whole, plain copies in bounded chunks."""
    items = []
    for unit in units:
        if isinstance(unit, CopyUnit) and not isinstance(unit.source, DecodedWeight):
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


def _stream_units(
    units: list[Unit],
    sink_of,
    reader: TensorReader,
    device: torch.device,
    codec: Codec,
    recipe: Recipe,
    allow_nonfinite: bool,
    meter: Progress,
    stats: Throughput,
    threads: int,
    reciprocals: ExactReciprocals | None = None,
) -> None:
    """Read, encode and hand to ``sink_of(unit)`` (a PositionalShardWriter) every unit, with reading (on
    ``threads`` threads), computing and writing (on ``threads`` threads) overlapped."""
    background = ParallelWriter(stats, threads, WRITE_AHEAD_BYTES)
    copying: dict[int, object] = {}  # a copied tensor's writer, from its first chunk to its last
    lanes = interleave_lanes(units, threads)
    lane_of = {id(u): lane for lane, u in lanes}
    units = [u for _, u in lanes]

    def load(item: tuple[Unit, int, int]):
        unit, offset, nbytes = item
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
            encoded = _encode_unit(unit, data, codec, recipe, allow_nonfinite, reader.root, reciprocals)
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


def _specs(shard: Shard) -> list[TensorSpec]:
    return list(shard.outputs)


def _write_shards_local(todo: list[Shard], state: OutputState, reader: TensorReader, **kw) -> None:
    """One process: each shard laid out when its first unit comes, its tensors written at their offsets by
    the writer threads (each digested by the thread that writes it), and the shard renamed and recorded by
    the thread that completes it, while the next shard's units stream on. On an error or a signal the
    unfinished shards' partial files are removed; the finished ones stay for --resume."""
    writers: dict[str, PositionalShardWriter] = {}
    shard_of = {id(u): shard for shard in todo for u in shard.units}

    def finished(writer: PositionalShardWriter) -> None:
        state.record(_with_reciprocals(writer.finish(), kw["reciprocals"].record))

    def sink_of(unit: Unit) -> PositionalShardWriter:
        shard = shard_of[id(unit)]
        if shard.file not in writers:
            PositionalShardWriter.create(state.dir, shard.file, _specs(shard))
            writers[shard.file] = PositionalShardWriter(state.dir, shard.file, _specs(shard), on_whole=finished)
        return writers[shard.file]

    try:
        _stream_units([u for shard in todo for u in shard.units], sink_of, reader, **kw)
        unfinished = [shard.file for shard in todo if not (state.dir / shard.file).exists()]
        if unfinished:
            raise IncompleteShardError(f"{state.dir}: shards {unfinished[:3]} were not completed; rerun with --resume")
    except BaseException:
        for f, w in writers.items():
            if not (state.dir / f).exists():
                w.abort()
        raise


def _with_reciprocals(record: dict, reciprocals: dict[str, tuple[int, int]]) -> dict:
    """A shard's record with the exact-reciprocal entries of its tensors: kept with the shard, so that a
    resumed run still knows those of the shards a previous run finished."""
    mine = ExactReciprocals()
    mine.record = {n: reciprocals[n] for n in record["tensors"] if n in reciprocals}
    return {**record, RECORD_KEY: mine.as_json()} if mine.record else record


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    key = (device, threading.get_ident())
    if key not in _COPY_STREAMS:
        _COPY_STREAMS[key] = torch.cuda.Stream(device=device)
    return _COPY_STREAMS[key]


def quantize(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    mlp_only: bool = False,
    experts_only: bool = False,
    exclude: tuple[str, ...] | list[str] = (),
    exclude_config: str | os.PathLike | None = None,
    weight_only: bool = False,
    scale_math: str = "cuda",
    device: str | None = None,
    max_shard_size: int = 5 * 10**9,
    dry_run: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    verify: bool = False,
    allow_nonfinite: bool = False,
    progress: str = "auto",
    format: str = "modelopt",
    input_scales_from: str | os.PathLike | None = None,
    io_threads: int | None = None,
    log=print,
) -> Summary:
    """Quantize a safetensors checkpoint to NVFP4 (ModelOpt format, or ``format="compressed-tensors"``),
    streaming tensor by tensor. ``input_scales_from``: a reference NVFP4 checkpoint of the same model whose
    ``input_scale`` values are written instead of 1.0. ``io_threads``: reader threads and writer threads of
    this process (default: from the CPUs, see ``runner.resolve_io_threads``).

    Returns the summary of the plan (and of the run, unless ``dry_run``). Under ``torchrun`` each rank
    writes a deterministic share of the shards and rank 0 writes the index and configs; the files are the
    same as a single process writes.
    """
    if mlp_only and experts_only:
        raise UsageError("--mlp_only and --experts_only exclude each other")
    if scale_math not in ("cuda", "cpu"):
        raise UsageError(f"--scale_math must be cuda or cpu, not {scale_math!r}")
    if max_shard_size <= 0:
        raise UsageError("--max_shard_size must be positive")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if input_scales_from is not None and weight_only:
        raise UsageError("--input_scales_from and --weight_only exclude each other (weight-only has no input scales)")
    threads = resolve_io_threads(io_threads)
    entered = time.perf_counter()
    input_dir = resolve_checkpoint_dir(input_dir)
    input_scales = reference_input_scales(input_scales_from) if input_scales_from is not None else {}
    recipe = Recipe(
        scope="experts" if experts_only else "mlp" if mlp_only else "all",
        exclude=tuple(exclude),
        reference_exclude=load_reference_exclusions(exclude_config) if exclude_config else (),
        weight_only=weight_only,
        scale_math=scale_math,  # type: ignore[arg-type]
        max_shard_size=max_shard_size,
        format=format,  # type: ignore[arg-type]
        input_scales=tuple(sorted(input_scales.items())),
    )
    if not dry_run:
        if output_dir is None:
            raise UsageError("--output_dir is required (or use --dry_run)")
        check_paths(input_dir, Path(output_dir))
    index = build_index(input_dir)
    plan = build_plan(index, recipe)
    if format == COMPRESSED_TENSORS:
        cubes = [u.modules[0] for u in plan.units if isinstance(u, QuantizeUnit) and u.layout == "experts_3d"]
        if cubes:
            raise UsageError(
                f"3-D fused experts ({cubes[0]}) have no compressed-tensors form; use --format modelopt "
                "or --exclude them"
            )
        exclude_modules = compressed_tensors_ignore(plan.unquantized, plan.linear_modules, index.config)
    else:
        exclude_modules = compact_exclusions(plan.unquantized, plan.linear_modules, index.config)
    summary = summarize(plan, input_dir, Path(output_dir) if output_dir else None)
    summary.exclude_modules = exclude_modules
    summary.phases["index and plan"] = time.perf_counter() - entered
    if input_scales_from is not None:
        summary.input_scales_missing = sorted(m for m in plan.quantized if m not in input_scales)
    rank, world = rank_and_world()
    if rank != 0:
        log = _silent
    for w in plan.warnings:
        log(f"warning: {w}")
    if family_of(index.config) is None:
        archs = ", ".join(index.config.get("architectures") or []) or index.config.get("model_type") or "unknown"
        log(
            f"note: architecture {archs} is not in the vLLM consumer table (modelopt_streaming/consumer.py): "
            "the exclude list is written exact both with and without vLLM's usual fused layer names"
        )
    if dry_run:
        return summary
    if world == 1 and world_size_env() > 1:
        raise UsageError(
            f"WORLD_SIZE={world_size_env()} (torchrun?) but no process group: each process would write the "
            "whole output; run the modelopt-streaming command under torchrun, or call "
            "modelopt_streaming.jobs.quantize.init_distributed() before quantize()"
        )
    dev = resolve_device(device)
    output_dir = Path(output_dir)
    state = OutputState(output_dir)
    fp = quantize_fingerprint(index, recipe, plan)
    planned = {s.file: [t.name for t in s.outputs] for s in plan.shards}
    lock = OutputDirLock(output_dir)  # taken (rank 0) before anything is written, held to the end
    try:
        return _write_output(
            plan,
            index,
            input_dir,
            output_dir,
            state,
            lock,
            fp,
            planned,
            exclude_modules,
            summary,
            recipe,
            rank=rank,
            world=world,
            dev=dev,
            threads=threads,
            resume=resume,
            verify=verify,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            progress=progress,
            log=log,
        )
    finally:
        lock.release()


def _write_output(
    plan: Plan,
    index: CheckpointIndex,
    input_dir: Path,
    output_dir: Path,
    state: OutputState,
    lock: OutputDirLock,
    fp: dict,
    planned: dict[str, list[str]],
    exclude_modules: list[str],
    summary: Summary,
    recipe: Recipe,
    *,
    rank: int,
    world: int,
    dev: torch.device,
    threads: int,
    resume: bool,
    verify: bool,
    overwrite: bool,
    allow_nonfinite: bool,
    progress: str,
    log,
) -> Summary:
    """Everything that writes: prepare the directory (resume or start), stream the shards, export."""
    weight_only = recipe.weight_only

    def take_and_prepare() -> None:
        lock.acquire()
        done = state.prepare(fp, planned, resume, verify, overwrite, source_dir=input_dir)
        state.check_free_space(sum(s.nbytes for s in plan.shards if s.file not in done))

    # Rank 0 may hash every finished shard (--resume --verify) while the others wait.
    verify_s = plan.output_bytes / SLOWEST_RATE if resume and verify else 0
    phase = time.perf_counter()
    on_rank0(rank, world, take_and_prepare, "prepare the output directory", GROUP_TIMEOUT_S + verify_s)
    check_shared_output(state, rank, world)
    summary.phases["prepare"] = time.perf_counter() - phase
    done = state.records()
    todo = [s for s in plan.shards if s.file not in done]
    if done:
        log(
            f"resuming: {len(done)} of {len(plan.shards)} shards already finished"
            + (" and verified by digest" if verify else " (sizes checked; --verify also checks their digests)")
        )
    if recipe.input_scales:
        log(f"input scales: from the reference for {len(plan.quantized) - len(summary.input_scales_missing)} modules")
    elif not weight_only:
        log(
            "note: activation scales are not calibrated: every input_scale is 1.0 (NVIDIA's calibration-free "
            "W4A4 recipe); use --weight_only for W4A16"
        )

    started = time.monotonic()
    map_large_buffers()
    codec = select_codec(dev)
    log(
        f"codec: {codec.name}"
        + (f", {cpu_kernel.threads()} threads" if "CPU kernel" in codec.name else "")
        + f"; {threads} reader and {threads} writer threads"
    )
    stats = Throughput()
    meter = Progress(sum(s.input_bytes for s in todo), mode=progress if rank == 0 else "none", log=log)
    try:
        with TensorReader(input_dir, threads=threads) as reader:
            kw = dict(device=dev, codec=codec, recipe=recipe, allow_nonfinite=allow_nonfinite, meter=meter, stats=stats)
            kw.update(threads=threads, reciprocals=ExactReciprocals())
            if world == 1:
                phase = time.perf_counter()
                _write_shards_local(todo, state, reader, **kw)
                summary.phases["stream"] = time.perf_counter() - phase
            else:
                write_shards_distributed(
                    todo,
                    state,
                    rank,
                    world,
                    specs={shard.file: _specs(shard) for shard in todo},
                    stream=lambda units, sink_of: _stream_units(units, sink_of, reader, **kw),
                    meter=meter,
                    reciprocals=kw["reciprocals"],
                    finished_record=_with_reciprocals,
                    phases=summary.phases,
                )
    except OSError as e:
        where = e.filename or output_dir
        raise OutputError(
            f"writing {where} failed: {e.strerror or e}; finished shards are kept, free the space "
            "or fix the cause and rerun with --resume"
        ) from None
    finally:
        meter.close()
    phase = time.perf_counter()
    if rank == 0:
        try:
            summary.zero_weights = export_checkpoint(
                plan, index, input_dir, output_dir, state, fp, exclude_modules, summary, recipe
            )
        except OSError as e:
            raise OutputError(
                f"writing {e.filename or output_dir} failed: {e.strerror or e}; rerun with --resume"
            ) from None
    summary.phases["export"] = time.perf_counter() - phase
    if world > 1:
        phase = time.perf_counter()
        barrier(rank, world, "export", GROUP_TIMEOUT_S)
        summary.phases["wait for export"] = time.perf_counter() - phase
    summary.seconds = time.monotonic() - started
    summary.stages = stats.line()
    return summary


def _silent(*_args) -> None:
    pass
