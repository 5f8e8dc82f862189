"""Runner: composes index -> plan -> reader -> codec -> writer -> export for one quantize job: takes the
checked options, plans, prepares the output directory, streams the units (``quantize_stream``, or across
torchrun ranks ``distributed``) and exports."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from modelopt_streaming.codec import algorithm_settings, cpu_kernel, select_codec
from modelopt_streaming.consumers.vllm import family_of, load_reference_exclusions
from modelopt_streaming.errors import OutputError, UsageError
from modelopt_streaming.formats.interchange import COMPRESSED_TENSORS
from modelopt_streaming.jobs.calibration import calibration_key, load_data, run_calibration
from modelopt_streaming.jobs.distributed import (
    GROUP_TIMEOUT_S,
    SLOWEST_RATE,
    barrier,
    check_shared_output,
    init_distributed,
    on_rank0,
    rank_and_world,
    world_size_env,
    write_shards_distributed,
)
from modelopt_streaming.jobs.gptq import GptqSettings, GptqUnits
from modelopt_streaming.jobs.pipeline import map_large_buffers
from modelopt_streaming.jobs.progress import Progress
from modelopt_streaming.jobs.quantize_export import export_checkpoint
from modelopt_streaming.jobs.quantize_job import QuantizeJob, QuantizeOptions
from modelopt_streaming.jobs.quantize_stream import LiveUnits, stream_units, write_shards_local
from modelopt_streaming.jobs.summary import Summary, summarize
from modelopt_streaming.plan.build import Plan, QuantizeUnit, Recipe, Shard, build_plan
from modelopt_streaming.sink.export import compact_exclusions
from modelopt_streaming.sink.export.compressed_tensors_format import compressed_tensors_ignore
from modelopt_streaming.sink.output_dir import OutputDirLock, OutputState, check_paths, quantize_fingerprint
from modelopt_streaming.source.hub_cache import resolve_checkpoint_dir
from modelopt_streaming.source.index import CheckpointIndex, build_index
from modelopt_streaming.source.quantized import reference_input_scales
from modelopt_streaming.source.reader import TensorReader
from modelopt_streaming.source.vendor import read_dtype

# init_distributed is public here: quantize's WORLD_SIZE error tells callers to call it from this module.
__all__ = ["init_distributed", "quantize", "quantize_gptq", "resolve_device", "resolve_io_threads"]

_log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """The device the codec runs on: ``None`` or ``"auto"`` is CUDA when available, else the CPU.

    Raises:
        UsageError: a CUDA device was asked for and CUDA is not available.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_io_threads(requested: int | None = None) -> int:
    """Reader threads, and as many writer threads, of one process: ``requested``, or the CPUs it may use
    shared among the processes of this node (torchrun's LOCAL_WORLD_SIZE), two to eight. One stream of a
    kernel copy is what a single thread moves; RAID, tmpfs and parallel file systems serve several."""
    if requested is not None:
        return requested
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(2, min(8, len(os.sched_getaffinity(0)) // (2 * local)))


def _check_gptq_sources(plan, root: Path, calib_dtype: str) -> None:
    """GPTQ solves the weights the engine's forward holds as read (``LayerStream.live_views``: a parameter whose
    dtype is the one its source is read in); a weight read in another dtype than the one the model runs in
    (``--calib_dtype``) is cast on loading, so no solve would see it and every unit would silently stay unsolved
    (found on a float32 SmolLM2 checkpoint run in bf16). Refused before any work, naming the tensor and the remedy."""
    runs_in = getattr(torch, calib_dtype)
    for unit in plan.units:
        if not isinstance(unit, QuantizeUnit):
            continue
        for src in unit.sources:
            read_in = read_dtype(src)
            if read_in != runs_in:
                fix = "pass --calib_dtype float32" if read_in == torch.float32 else "convert the checkpoint first"
                raise UsageError(
                    f"{root / src.file}, tensor {src.name!r}: --algorithm gptq solves the weights the model runs "
                    f"with, in --calib_dtype {calib_dtype}, and this one is read as {str(read_in)[6:]}: {fix}"
                )


def quantize_gptq(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    gptq: GptqSettings | None = None,
    options: QuantizeOptions | None = None,
    **overrides: Any,
) -> Summary:
    """``quantize(..., algorithm="gptq")`` with GPTQ's settings (``jobs.gptq.GptqSettings``: act order, damping,
    block, the token count below which an expert keeps round-to-nearest, sequential). Under torchrun every rank
    runs every row through every layer and the ranks split each layer's solves.

    Raises:
        UsageError: no calibration data, or the compressed-tensors format; and as ``quantize``.
    """
    options = dataclasses.replace(options or QuantizeOptions(), **{**overrides, "algorithm": "gptq"})
    return _quantize(input_dir, output_dir, options, gptq or GptqSettings())


def quantize(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    options: QuantizeOptions | None = None,
    **overrides: Any,
) -> Summary:
    """Quantize a safetensors checkpoint to NVFP4 (ModelOpt format, or ``format="compressed-tensors"``),
    streaming tensor by tensor.

    Under ``torchrun`` each rank writes a deterministic share of the units and rank 0 writes the index and
    configs; the files are those a single process writes. Messages (warnings, notes, progress lines) go to
    the ``modelopt_streaming`` logger; the command line prints them on stderr.

    Args:
        input_dir: the source checkpoint directory, or a Hub id already in the local cache.
        output_dir: where the NVFP4 checkpoint goes; required unless ``dry_run``.
        options: the run's options (``QuantizeOptions``); default: all defaults.
        **overrides: any ``QuantizeOptions`` field by name (``mlp_only=True``, ``device="cpu"``, ...), applied
            over ``options``.

    Returns:
        The summary of the plan, and of the run unless ``dry_run``.

    Raises:
        UsageError: an option, or a combination of them, the command cannot run with (nothing is written).
        TypeError: a keyword that names no option.
        CheckpointError: the source cannot be read as a checkpoint, or holds what cannot be quantized.
        ConsumerError: no exclude list describes the plan exactly for vLLM.
        OutputStateError: the output directory cannot be used (in use, foreign files, changed options).
        OutputError: writing failed; finished shards are kept for ``resume``.
        IncompleteShardError: a shard was left incomplete.
        RankLostError: under torchrun, a rank died or stalled.
    """
    return _quantize(input_dir, output_dir, dataclasses.replace(options or QuantizeOptions(), **overrides))


def _quantize(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None,
    options: QuantizeOptions,
    gptq: GptqSettings | None = None,
) -> Summary:
    entered = time.perf_counter()
    if options.algorithm == "gptq" and gptq is None:
        gptq = GptqSettings()
    input_dir = resolve_checkpoint_dir(input_dir)
    input_scales = reference_input_scales(options.input_scales_from) if options.input_scales_from is not None else {}
    data, index = None, None
    if options.calib_data is not None:
        # The data and the architecture are checked before anything else; the calibration itself runs once
        # the output directory is locked and prepared (it keeps its progress there for --resume).
        index = build_index(input_dir)
        data = load_data(index, options)
    recipe = Recipe(
        scope=options.scope,  # type: ignore[arg-type]
        exclude=options.exclude,
        reference_exclude=load_reference_exclusions(options.exclude_config) if options.exclude_config else (),
        weight_only=options.weight_only,
        scale_math=options.scale_math,  # type: ignore[arg-type]
        max_shard_size=options.max_shard_size,
        format=options.format,  # type: ignore[arg-type]
        input_scales=tuple(sorted(input_scales.items())),
        kv_cache=options.kv_cache,  # type: ignore[arg-type]
        algorithm=options.algorithm,
        algorithm_settings=tuple(gptq.settings().items())
        if gptq is not None
        else tuple(algorithm_settings(options.algorithm).items()),
        # A dry run asks for no device (it may plan a GPU run on a machine without one).
        calibration=calibration_key(data, options, resolve_device(options.device), gptq)
        if data and not options.dry_run
        else "",
    )
    if not options.dry_run:
        if output_dir is None:
            raise UsageError("--output_dir is required (or use --dry_run)")
        check_paths(input_dir, Path(output_dir))
    index = index or build_index(input_dir)
    plan = build_plan(index, recipe)
    if gptq is not None:
        _check_gptq_sources(plan, input_dir, options.calib_dtype)
    exclude_modules = _exclusions(plan, index, recipe)
    summary = summarize(plan, input_dir, Path(output_dir) if output_dir else None)
    summary.exclude_modules = exclude_modules
    summary.phases["index and plan"] = time.perf_counter() - entered
    if options.input_scales_from is not None:
        summary.input_scales_missing = sorted(m for m in plan.quantized if m not in input_scales)
    rank, world = rank_and_world()
    for w in plan.warnings:
        _log.warning(f"warning: {w}")
    if family_of(index.config) is None:
        archs = ", ".join(index.config.get("architectures") or []) or index.config.get("model_type") or "unknown"
        _log.info(
            f"note: architecture {archs} is not in the vLLM consumer table (modelopt_streaming/consumer.py): "
            "the exclude list is written exact both with and without vLLM's usual fused layer names"
        )
    if options.dry_run:
        return summary
    if world == 1 and world_size_env() > 1:
        raise UsageError(
            f"WORLD_SIZE={world_size_env()} (torchrun?) but no process group: each process would write the "
            "whole output; run the modelopt-streaming command under torchrun, or call "
            "modelopt_streaming.jobs.quantize.init_distributed() before quantize()"
        )
    output_dir = Path(output_dir)
    job = QuantizeJob(
        options=options,
        input_dir=input_dir,
        output_dir=output_dir,
        index=index,
        recipe=recipe,
        plan=plan,
        exclude_modules=exclude_modules,
        summary=summary,
        state=OutputState(output_dir),
        fingerprint=quantize_fingerprint(index, recipe, plan),
        rank=rank,
        world=world,
        device=resolve_device(options.device),
        threads=resolve_io_threads(options.io_threads),
        calibration_data=data,
        gptq=gptq,
    )
    lock = OutputDirLock(output_dir)  # taken (rank 0) before anything is written, held to the end
    try:
        return _write_output(job, lock)
    finally:
        lock.release()


def _calibrate(job: QuantizeJob, live: LiveUnits | None = None) -> None:
    """Run (or, resumed, finish) the calibration and put its scales into the job's recipe; the plan already
    holds their names and the fingerprint the data's digest, so a resumed run checks both before this. With
    ``live``, each layer's units are written from the tensors the calibration read (one read of the source)."""
    options = job.options
    phase = time.perf_counter()
    weights = GptqUnits(job, live, job.gptq) if job.gptq is not None and live is not None else None
    run = run_calibration(
        job.index,
        job.calibration_data,
        options,
        job.device,
        job.threads,
        state_dir=job.state.records_dir / "calibration",
        rank=job.rank,
        world=job.world,
        on_live=live,
        weights=weights,
    )
    input_scales = {} if options.weight_only else run.input_scales
    job.recipe = dataclasses.replace(
        job.recipe, input_scales=tuple(sorted(input_scales.items())), kv_scales=tuple(sorted(run.kv_scales.items()))
    )
    job.summary.calibration = run.report()
    if weights is not None:
        job.summary.calibration["weights"] = report = weights.report(run.calibration)
        if report["units_not_solved"] and job.rank == 0:
            _log.warning(
                "warning: --algorithm gptq: %d units no decoder layer holds were written with %s scales and no "
                "GPTQ (first: %s)",
                len(report["units_not_solved"]),
                weights.settings.scales,
                report["units_not_solved"][0],
            )
    job.summary.source_bytes_read += run.bytes_read
    job.summary.phases["calibrate"] = time.perf_counter() - phase
    if not options.weight_only:
        job.summary.input_scales_missing = sorted(m for m in job.plan.quantized if m not in input_scales)
    data = job.summary.calibration["data"]
    _log.info(
        f"input scales: calibrated on {data['rows']} x {data['seq_len']} tokens for "
        f"{len(job.plan.quantized) - len(job.summary.input_scales_missing)} modules"
        + (f"; {len(live.written)} units written from the calibration's tensors" if live is not None else "")
    )


def _live_calibration(job: QuantizeJob, todo: list[Shard]):
    """``write_shards_local``'s first step for a calibrated run: the calibration, writing each layer's units
    while the layer is on the device; returns the ids of the units it wrote."""

    def before(sink_of) -> set[int]:
        live = LiveUnits(job, todo, sink_of)
        try:
            _calibrate(job, live)
        except BaseException:
            with contextlib.suppress(BaseException):  # the calibration's error is the one to report
                live.close()
            raise
        live.close()
        return live.written

    return before


def _exclusions(plan: Plan, index: CheckpointIndex, recipe: Recipe) -> list[str]:
    """The exclude list of the output's config, in its dialect's terms."""
    if recipe.format != COMPRESSED_TENSORS:
        return compact_exclusions(plan.unquantized, plan.linear_modules, index.config)
    cubes = [u.modules[0] for u in plan.units if isinstance(u, QuantizeUnit) and u.layout == "experts_3d"]
    if cubes:
        raise UsageError(
            f"3-D fused experts ({cubes[0]}) have no compressed-tensors form; use --format modelopt or --exclude them"
        )
    return compressed_tensors_ignore(plan.unquantized, plan.linear_modules, index.config)


def _write_output(job: QuantizeJob, lock: OutputDirLock) -> Summary:
    """Everything that writes: prepare the directory (resume or start), stream the shards, export."""
    options, plan, state, summary = job.options, job.plan, job.state, job.summary
    rank, world = job.rank, job.world

    def take_and_prepare() -> None:
        lock.acquire()
        done = state.prepare(
            job.fingerprint, job.planned, options.resume, options.verify, options.overwrite, source_dir=job.input_dir
        )
        state.check_free_space(sum(s.nbytes for s in plan.shards if s.file not in done))

    # Rank 0 may hash every finished shard (--resume --verify) while the others wait.
    verify_s = plan.output_bytes / SLOWEST_RATE if options.resume and options.verify else 0
    phase = time.perf_counter()
    on_rank0(rank, world, take_and_prepare, "prepare the output directory", GROUP_TIMEOUT_S + verify_s)
    check_shared_output(state, rank, world)
    summary.phases["prepare"] = time.perf_counter() - phase
    if job.calibration_data is not None and world > 1 and job.gptq is None:
        # Each rank runs its share of the rows through every layer; the stream reads the weights again.
        _calibrate(job)
    done = state.records()
    todo = [s for s in plan.shards if s.file not in done]
    if done:
        _log.info(
            f"resuming: {len(done)} of {len(plan.shards)} shards already finished"
            + (" and verified by digest" if options.verify else " (sizes checked; --verify also checks their digests)")
        )
    # A calibrated run says where its input scales come from once the calibration has run (_calibrate).
    if job.calibration_data is None and job.recipe.input_scales:
        _log.info(
            f"input scales: from the reference for {len(plan.quantized) - len(summary.input_scales_missing)} modules"
        )
    elif job.calibration_data is None and not options.weight_only:
        _log.info(
            "note: activation scales are not calibrated: every input_scale is 1.0 (NVIDIA's calibration-free "
            "W4A4 recipe); use --weight_only for W4A16"
        )

    started = time.monotonic()
    map_large_buffers()
    # GPTQ fixes the scales of its ``scales`` algorithm and chooses the codes (jobs.gptq); a unit no layer holds
    # is written by the stream with those scales' own encoding.
    job.codec = select_codec(job.device, job.gptq.scales if job.gptq is not None else job.recipe.algorithm)
    _log.info(
        f"codec: {job.codec.name}"
        + (f", {cpu_kernel.threads()} threads" if "CPU kernel" in job.codec.name else "")
        + f"; {job.threads} reader and {job.threads} writer threads"
    )
    job.meter = Progress(sum(s.input_bytes for s in todo), mode=options.progress if rank == 0 else "none")
    try:
        with TensorReader(job.input_dir, threads=job.threads) as job.reader:
            if world == 1:
                phase = time.perf_counter()
                before = _live_calibration(job, todo) if job.calibration_data is not None else None
                write_shards_local(job, todo, before)
                summary.phases["stream"] = time.perf_counter() - phase - summary.phases.get("calibrate", 0.0)
            else:
                # GPTQ writes each layer's units from the calibration (every rank runs it, each writes its share).
                before = _live_calibration(job, todo) if job.gptq is not None else None
                write_shards_distributed(job, todo, lambda units, sink_of: stream_units(job, units, sink_of), before)
    except OSError as e:
        where = e.filename or job.output_dir
        raise OutputError(
            f"writing {where} failed: {e.strerror or e}; finished shards are kept, free the space "
            "or fix the cause and rerun with --resume"
        ) from None
    finally:
        job.meter.close()
        summary.source_bytes_read += job.reader.bytes_read if job.reader is not None else 0
        job.reader = None
    phase = time.perf_counter()
    if rank == 0:
        try:
            summary.zero_weights = export_checkpoint(job)
        except OSError as e:
            raise OutputError(
                f"writing {e.filename or job.output_dir} failed: {e.strerror or e}; rerun with --resume"
            ) from None
    summary.phases["export"] = time.perf_counter() - phase
    if world > 1:
        phase = time.perf_counter()
        barrier(rank, world, "export", GROUP_TIMEOUT_S)
        summary.phases["wait for export"] = time.perf_counter() - phase
    summary.seconds = time.monotonic() - started
    summary.stages = job.stats.line()
    return summary
