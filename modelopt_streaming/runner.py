"""Runner: composes index -> plan -> reader -> codec -> writer -> export for one quantize job."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__, faults
from .codec import cpu_kernel, cuda_kernel, nvfp4
from .consumer import family_of
from .export import compact_exclusions, copy_side_files, hf_quant_config, model_config, safetensors_index
from .export.compressed_tensors_format import compressed_tensors_ignore
from .export.compressed_tensors_format import model_config as ct_model_config
from .index import (
    INDEX_FILE,
    CheckpointError,
    CheckpointIndex,
    DecodedWeight,
    TensorInfo,
    build_index,
    header_digest,
    load_json,
    read_header,
    resolve_checkpoint_dir,
)
from .interchange import COMPRESSED_TENSORS, FORMATS, LEAVES, RECORD_KEY, ExactReciprocals, reference_input_scales
from .output_dir import (
    FINISHED_MARKER,
    PROVENANCE_FILE,
    OutputDirLock,
    OutputState,
    OutputStateError,
    is_writable_location,
)
from .pipeline import BackgroundWriter, Throughput, read_ahead
from .plan import CopyUnit, Plan, QuantizeUnit, Recipe, Shard, Unit, build_plan, unit_sources
from .progress import Progress
from .reader import TensorReader
from .writer import IncompleteShardError, PositionalShardWriter, ShardWriter, TensorSpec, write_json_atomic


class UsageError(Exception):
    """The command cannot run as asked (paths, options); nothing was written."""


@dataclass
class Summary:
    input_dir: str
    output_dir: str | None
    quantized_weights: int
    quantized_by_kind: dict[str, int]
    fused_groups: dict[str, int]
    copied_tensors: int
    unquantized_modules: int
    unquantized_by_reason: dict[str, int]
    input_bytes: int
    output_bytes: int
    shards: int
    exclude_modules: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stages: str = ""
    warnings: list[str] = field(default_factory=list)
    # Quantized modules whose weight (or whole fused group) was all zeros: written as exact zeros with a
    # finite global scale, where ModelOpt writes NaN (docs/codec.md). Known after the run.
    zero_weights: list[str] = field(default_factory=list)
    format: str = "modelopt"
    # --input_scales_from: quantized modules the reference gives no input scale for (they keep 1.0).
    input_scales_missing: list[str] = field(default_factory=list)
    # The plan module by module (--json): quantized modules by kind, unquantized by reason, fused groups.
    plan: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        gb = 1e9
        kinds = ", ".join(f"{k} {v}" for k, v in self.quantized_by_kind.items())
        out = [
            f"quantize: {self.quantized_weights} weights" + (f" ({kinds})" if kinds else ""),
            "fused groups: " + (", ".join(f"{k}: {v}" for k, v in self.fused_groups.items()) or "none"),
            f"copy: {self.copied_tensors} tensors unchanged",
            f"unquantized Linear modules: {self.unquantized_modules}",
        ]
        out += [f"  {reason}: {n}" for reason, n in self.unquantized_by_reason.items()]
        if self.zero_weights:
            shown = ", ".join(self.zero_weights[:6]) + (" ..." if len(self.zero_weights) > 6 else "")
            out.append(
                f"all-zero weights: {len(self.zero_weights)}, written as exact zeros with weight_scale_2 "
                f"{nvfp4.ZERO_WEIGHT_SCALE_2} (ModelOpt would write NaN scales): {shown}"
            )
        if self.input_scales_missing:
            shown = ", ".join(self.input_scales_missing[:6]) + (" ..." if len(self.input_scales_missing) > 6 else "")
            out.append(
                f"input scales: {len(self.input_scales_missing)} quantized modules not in the reference keep 1.0: "
                f"{shown}"
            )
        if self.exclude_modules:
            key = "ignore" if self.format == COMPRESSED_TENSORS else "exclude_modules"
            shown = ", ".join(self.exclude_modules[:12]) + (" ..." if len(self.exclude_modules) > 12 else "")
            out.append(f"{key} ({len(self.exclude_modules)} entries): {shown}")
        out.append(
            f"output: {self.shards} shard(s), {self.output_bytes / gb:.3f} GB (input {self.input_bytes / gb:.3f} GB)"
        )
        if self.seconds:
            rate = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
            out.append(
                f"time: {self.seconds:.1f} s, {rate:.0f} MB/s of input"
                + (f" (busy stages: {self.stages})" if self.stages else "")
            )
        return out


def load_reference_exclusions(path: str | os.PathLike) -> tuple[str, ...]:
    """``exclude_modules`` of an hf_quant_config.json, or ``ignore`` of a config.json's quantization_config."""
    data = load_json(Path(path))
    quant = data.get("quantization")
    if isinstance(quant, dict) and "exclude_modules" in quant:
        return tuple(quant["exclude_modules"] or ())
    qc = data.get("quantization_config")
    if isinstance(qc, dict) and "ignore" in qc:
        return tuple(qc["ignore"] or ())
    if "exclude_modules" in data or "ignore" in data:
        return tuple(data.get("exclude_modules") or data.get("ignore") or ())
    raise CheckpointError(f"{path}: no exclude_modules or quantization_config.ignore list")


def summarize(plan: Plan, input_dir: Path, output_dir: Path | None) -> Summary:
    return Summary(
        input_dir=str(input_dir),
        output_dir=str(output_dir) if output_dir else None,
        quantized_weights=len(plan.quantized),
        quantized_by_kind=plan.quantized_kind_counts(),
        fused_groups=plan.fused_group_counts(),
        copied_tensors=sum(isinstance(u, CopyUnit) for u in plan.units),
        unquantized_modules=len(plan.unquantized),
        unquantized_by_reason=plan.unquantized_reason_counts(),
        input_bytes=plan.input_bytes,
        output_bytes=plan.output_bytes,
        shards=len(plan.shards),
        warnings=list(plan.warnings),
        format=plan.recipe.format,
        plan=plan_details(plan),
    )


def plan_details(plan: Plan) -> dict:
    """Every module of the plan by what happens to it, and the shards (what --json prints)."""
    quantized: dict[str, list[str]] = {}
    for module, kind in sorted(plan.quantized.items()):
        quantized.setdefault(kind, []).append(module)
    unquantized: dict[str, list[str]] = {}
    for module, reason in plan.unquantized.items():
        unquantized.setdefault(reason, []).append(module)
    fused: dict[str, list[list[str]]] = {}
    for unit in plan.units:
        if isinstance(unit, QuantizeUnit) and unit.fusion:
            fused.setdefault(unit.fusion, []).append(list(unit.modules))
    return {
        "quantized_by_kind": quantized,
        "unquantized_by_reason": unquantized,
        "fused_groups": fused,
        "shards": [{"file": s.file, "bytes": s.nbytes, "tensors": len(s.outputs)} for s in plan.shards],
    }


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return dev


class OutputError(Exception):
    """Writing the output failed (disk full, I/O error); finished shards are kept for --resume."""


def _check_paths(input_dir: Path, output_dir: Path) -> None:
    src, dst = input_dir.resolve(), output_dir.resolve()
    if dst == src or src in dst.parents:
        raise UsageError(f"output directory {output_dir} is the input directory or inside it")
    if dst in src.parents:
        raise UsageError(f"output directory {output_dir} contains the input directory")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"output path {output_dir} exists and is not a directory")
    why = is_writable_location(dst)
    if why:
        raise UsageError(why)


def fingerprint(index: CheckpointIndex, recipe: Recipe, plan: Plan) -> dict:
    """What the output depends on: tool version, source layout, options and the planned shards."""
    layout = hashlib.sha256(json.dumps([[s.file, [t.name for t in s.outputs]] for s in plan.shards]).encode())
    return {
        "tool_version": __version__,
        "source": {
            f: {"size": index.file_sizes[f], "header_sha256": header_digest(index.root / f)} for f in index.files
        },
        "options": _recipe_dict(recipe),
        "plan_sha256": layout.hexdigest(),
    }


def _recipe_dict(recipe: Recipe) -> dict:
    d = asdict(recipe)
    d["exclude"], d["reference_exclude"] = list(recipe.exclude), list(recipe.reference_exclude)
    # Thousands of values on a large model: their digest changes when any of them does.
    scales = json.dumps(list(recipe.input_scales)).encode()
    d["input_scales"] = {"count": len(recipe.input_scales), "sha256": hashlib.sha256(scales).hexdigest()}
    return d


# Source bytes read ahead of the codec: a dense DeepSeek-V3 gate/up group (528 MB) and the weight after
# it fit, and peak memory stays under 1.5 GB; a group larger than this still runs, one at a time.
READ_AHEAD_BYTES = 640 * 1024 * 1024
COPY_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class _Codec:
    tensor_amax: Callable[[torch.Tensor], torch.Tensor]
    quantize: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    name: str


def select_codec(device: torch.device) -> _Codec:
    """The fused C kernel on the CPU when it was built, else the reference torch codec (CPU or CUDA)."""
    if device.type == "cpu" and cpu_kernel.available():
        return _Codec(cpu_kernel.tensor_amax, cpu_kernel.quantize, "fused CPU kernel")
    if device.type == "cuda" and cuda_kernel.available():
        return _Codec(nvfp4.tensor_amax, cuda_kernel.quantize, "fused CUDA kernel (Triton)")
    return _Codec(nvfp4.tensor_amax, nvfp4.quantize, f"torch reference codec on {device.type}")


def _encode_unit(
    unit: QuantizeUnit,
    members: list[torch.Tensor],
    codec: _Codec,
    recipe: Recipe,
    allow_nonfinite: bool,
    root: Path,
    reciprocals: ExactReciprocals | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """The output tensors of one unit, in the plan's order; the group shares one weight_scale_2."""
    amaxes = [codec.tensor_amax(w) for w in members]
    for src, w, amax in zip(unit.sources, members, amaxes):
        if not torch.isfinite(amax) and not allow_nonfinite:
            bad = int((~torch.isfinite(w)).sum())
            raise CheckpointError(
                f"{root / src.file}, tensor {src.name!r}: {bad} NaN/Inf values in a weight to be "
                "quantized (use --allow_nonfinite to quantize it anyway)"
            )
    weight_scale_2 = nvfp4.weight_scale_2_from_amax(
        torch.stack([a.float().cpu() for a in amaxes]).max(), recipe.scale_math
    )
    # A reference checkpoint's input scales (--input_scales_from): a fused group takes the largest of its
    # members', as ModelOpt's export unifies them; a module the reference lacks keeps 1.0.
    known = [recipe.input_scale_of[m] for m in unit.modules if m in recipe.input_scale_of]
    input_scale = torch.tensor(max(known) if known else 1.0, dtype=torch.float32)
    out = []
    if unit.layout == "experts_3d":
        (name,), (w,) = unit.modules, members
        packed, block_scales = nvfp4.quantize_experts(w, weight_scale_2, codec.quantize)
        out += [(name, packed.cpu()), (f"{name}_weight_scale", block_scales.cpu())]
        out.append((f"{name}_weight_scale_2", weight_scale_2))
        if unit.with_input_scale:
            out.append((f"{name}_input_scale", input_scale))
        return out
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
        out.append((f"{module}.{leaf['weight']}", packed.cpu()))
        out.append((f"{module}.{leaf['weight_scale']}", block_scales.cpu()))
        out.append((f"{module}.{leaf['global']}", global_scale))
        if unit.with_input_scale:
            out.append((f"{module}.{leaf['input']}", member_input_scale))
    return out


def _divisor(reciprocals: ExactReciprocals, scale: torch.Tensor, name: str) -> torch.Tensor:
    """compressed-tensors' float32 [1] divisor for a ModelOpt scale (its correctly rounded reciprocal)."""
    return torch.tensor([reciprocals.convert("", float(scale), name)], dtype=torch.float32)


# Collectives that follow a _checkpoint (everyone is there) and the start-up rendezvous; every wait for a
# rank's real work goes through _checkpoint with a timeout sized to that work instead.
GROUP_TIMEOUT_S = 600
# A rank that moves fewer bytes per second than this through its share is treated as stuck.
SLOWEST_RATE = 20e6
# Seconds a rank may lag at the end of its share beyond SLOWEST_RATE (default GROUP_TIMEOUT_S): lower it
# to learn sooner of a node that vanished without closing its connections.
RANK_SLACK_ENV = "MODELOPT_STREAMING_RANK_SLACK_S"


def _rank_slack_s() -> float:
    try:
        return float(os.environ.get(RANK_SLACK_ENV, GROUP_TIMEOUT_S))
    except ValueError:
        raise UsageError(f"{RANK_SLACK_ENV}={os.environ[RANK_SLACK_ENV]!r} is not a number of seconds") from None


def init_distributed(device: str | None) -> tuple[str | None, bool]:
    """Under torchrun: one process group for coordination (gloo: only barriers and small objects travel)
    and, with CUDA, one GPU per rank by LOCAL_RANK."""
    if _world_size_env() <= 1:
        return device, False
    import datetime

    import torch.distributed as dist

    try:
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    except (ValueError, RuntimeError) as e:  # no MASTER_ADDR, rendezvous failed or timed out
        raise UsageError(f"WORLD_SIZE={_world_size_env()} but no process group could be formed: {e}") from None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    return device, True


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _world_size_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _on_rank0(rank: int, world: int, fn, step: str, timeout_s: float):
    """Run ``fn`` on rank 0 and raise its error, if any, on every rank (so none waits forever)."""
    error = None
    if rank == 0:
        try:
            fn()
        except (OutputStateError, OSError) as e:
            error = str(e)
    if world > 1:
        import torch.distributed as dist

        _checkpoint(rank, world, step, timeout_s)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UsageError(error)


class RankLostError(OutputError):
    """A torchrun rank died, failed or stalled; the message names it. Finished shards are kept."""


def _checkpoint(rank: int, world: int, step: str, timeout_s: float) -> None:
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


def _check_shared_output(state: OutputState, rank: int, world: int) -> None:
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
    _checkpoint(rank, world, "shared output check", GROUP_TIMEOUT_S)
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


def _memory_bytes(item: tuple[Unit, int, int]) -> int:
    """What one read item holds in memory: its bytes, plus the bf16 tensor a decoded source becomes."""
    unit, _offset, nbytes = item
    decoded = [s for s in unit_sources(unit) if isinstance(s, DecodedWeight)]
    return nbytes + sum(2 * d.numel for d in decoded)


def _stream_units(
    units: list[Unit],
    sink_of,
    reader: TensorReader,
    device: torch.device,
    codec: _Codec,
    recipe: Recipe,
    allow_nonfinite: bool,
    meter: Progress,
    stats: Throughput,
    reciprocals: ExactReciprocals | None = None,
) -> None:
    """Read, encode and hand to ``sink_of(unit)`` (a writer: begin / write_bytes / write) every unit, with
    reading, computing and writing overlapped."""
    background = BackgroundWriter(stats)

    def load(item: tuple[Unit, int, int]):
        unit, offset, nbytes = item
        if isinstance(unit, CopyUnit):
            if isinstance(unit.source, DecodedWeight):
                return reader.read(unit.source)
            return reader.read_chunk(unit.source, offset, nbytes)
        members = [reader.read(src, pin_memory=device.type == "cuda") for src in unit.sources]
        if device.type == "cuda":
            # Copy on a side stream from page-locked memory while the codec works on the previous unit.
            stream = _copy_stream(device)
            with torch.cuda.stream(stream):
                members = [m.to(device, non_blocking=True) for m in members]
            stream.synchronize()
        return members

    try:
        for (unit, offset, nbytes), data in read_ahead(
            _unit_reads(units), load, _memory_bytes, READ_AHEAD_BYTES, stats
        ):
            faults.point("unit")
            sink = sink_of(unit)
            if isinstance(unit, CopyUnit) and isinstance(unit.source, DecodedWeight):
                background.submit(sink.write, unit.source.name, data, nbytes=data.numel() * data.element_size())
                meter.advance(nbytes, stats)
                continue
            if isinstance(unit, CopyUnit):
                if offset == 0:
                    background.submit(sink.begin, unit.source.name)
                if nbytes:
                    background.submit(sink.write_bytes, data, nbytes=nbytes)
                meter.advance(nbytes, stats)
                continue
            t = time.perf_counter()
            if device.type == "cuda":
                for member in data:  # made on the copy stream, used and freed on this one
                    member.record_stream(torch.cuda.current_stream(device))
            encoded = _encode_unit(unit, data, codec, recipe, allow_nonfinite, reader.root, reciprocals)
            del data
            stats.compute_s += time.perf_counter() - t
            for name, tensor in encoded:
                background.submit(sink.write, name, tensor, nbytes=tensor.numel() * tensor.element_size())
            meter.advance(nbytes, stats)
        background.close()
    except BaseException:
        with contextlib.suppress(BaseException):  # the first error is the one to report
            background.close()
        raise


def _specs(shard: Shard) -> list[TensorSpec]:
    return [TensorSpec(t.name, t.dtype, t.shape) for t in shard.outputs]


def _write_shards_streaming(todo: list[Shard], state: OutputState, reader: TensorReader, **kw) -> None:
    """One process: each shard streamed front to back, hashed on the way, renamed when whole."""
    for shard in todo:
        writer = ShardWriter(state.dir, shard.file, _specs(shard))
        try:
            _stream_units(list(shard.units), lambda _unit, w=writer: w, reader, **kw)
            state.record(_with_reciprocals(writer.close(), kw["reciprocals"].record))
        except BaseException:
            writer.abort()
            raise


def _write_shards_distributed(
    todo: list[Shard], state: OutputState, reader: TensorReader, rank: int, world: int, **kw
) -> None:
    """torchrun: rank 0 lays out every unfinished shard at its final size; each rank writes its share of
    the units at their planned offsets, so the work splits evenly whatever the shard count; then the ranks
    hash, rename and record the shards between them. The bytes are those of a single process."""
    import torch.distributed as dist

    if rank == 0:
        for shard in todo:
            PositionalShardWriter.create(state.dir, shard.file, _specs(shard))
    _checkpoint(rank, world, "lay out shards", GROUP_TIMEOUT_S)
    writers = {shard.file: PositionalShardWriter(state.dir, shard.file, _specs(shard)) for shard in todo}
    shard_of = {id(u): shard.file for shard in todo for u in shard.units}
    units = [u for shard in todo for u in shard.units]
    mine = _contiguous_share(units, rank, world)
    kw["meter"].set_total(sum(sum(src.nbytes for src in unit_sources(u)) for u in mine))
    try:
        _stream_units(mine, lambda unit: writers[shard_of[id(unit)]], reader, **kw)
    finally:
        for w in writers.values():
            w.close()
    # The slowest rank's share bounds the wait (shares are balanced by bytes, so this is generous).
    largest = max(
        sum(sum(s.nbytes for s in unit_sources(u)) for u in _contiguous_share(units, r, world)) for r in range(world)
    )
    _checkpoint(rank, world, "write shares", _rank_slack_s() + largest / SLOWEST_RATE)
    # What every rank completed: a shard is renamed only when all its planned bytes were written. One bit
    # per planned tensor (an int), not names: a DeepSeek-sized plan gathers kilobytes, not megabytes.
    names = {f: [t.name for t in w.tensors] for f, w in writers.items()}
    mine_done = {f: _bitmask(names[f], w.written()) for f, w in writers.items()}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (mine_done, kw["reciprocals"].record))
    records = {k: v for _, theirs in everyone for k, v in theirs.items()}
    for i, shard in enumerate(todo):  # hashing and renaming is shared out too
        if i % world == rank:
            mask = 0
            for done, _ in everyone:
                mask |= done[shard.file]
            written = _chosen(names[shard.file], mask)
            state.record(_with_reciprocals(writers[shard.file].finish(written), records))
    hashed = sum(s.nbytes for s in todo) / world
    _checkpoint(rank, world, "hash and rename shards", _rank_slack_s() + hashed / SLOWEST_RATE)


def _with_reciprocals(record: dict, reciprocals: dict[str, tuple[int, int]]) -> dict:
    """A shard's record with the exact-reciprocal entries of its tensors: kept with the shard, so that a
    resumed run still knows those of the shards a previous run finished."""
    mine = ExactReciprocals()
    mine.record = {n: reciprocals[n] for n in record["tensors"] if n in reciprocals}
    return {**record, RECORD_KEY: mine.as_json()} if mine.record else record


def _bitmask(names: list[str], chosen: set[str]) -> int:
    bits = bytearray((len(names) + 7) // 8)
    for j, n in enumerate(names):
        if n in chosen:
            bits[j >> 3] |= 1 << (j & 7)
    return int.from_bytes(bits, "little")


def _chosen(names: list[str], mask: int) -> set[str]:
    bits = mask.to_bytes((len(names) + 7) // 8, "little")
    return {n for j, n in enumerate(names) if bits[j >> 3] >> (j & 7) & 1}


def _contiguous_share(units: list[Unit], rank: int, world: int) -> list[Unit]:
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


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device=device)
    return _COPY_STREAMS[device]


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
    log=print,
) -> Summary:
    """Quantize a safetensors checkpoint to NVFP4 (ModelOpt format, or ``format="compressed-tensors"``),
    streaming tensor by tensor. ``input_scales_from``: a reference NVFP4 checkpoint of the same model whose
    ``input_scale`` values are written instead of 1.0.

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
        _check_paths(input_dir, Path(output_dir))
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
    if input_scales_from is not None:
        summary.input_scales_missing = sorted(m for m in plan.quantized if m not in input_scales)
    rank, world = _distributed()
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
    if world == 1 and _world_size_env() > 1:
        raise UsageError(
            f"WORLD_SIZE={_world_size_env()} (torchrun?) but no process group: each process would write the "
            "whole output; run the modelopt-streaming command under torchrun, or call "
            "modelopt_streaming.runner.init_distributed() before quantize()"
        )
    dev = resolve_device(device)
    output_dir = Path(output_dir)
    state = OutputState(output_dir)
    fp = fingerprint(index, recipe, plan)
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
        state.prepare(fp, planned, resume, verify, overwrite, source_dir=input_dir)

    # Rank 0 may hash every finished shard (--resume --verify) while the others wait.
    verify_s = plan.output_bytes / SLOWEST_RATE if resume and verify else 0
    _on_rank0(rank, world, take_and_prepare, "prepare the output directory", GROUP_TIMEOUT_S + verify_s)
    _check_shared_output(state, rank, world)
    done = state.records()
    todo = [s for s in plan.shards if s.file not in done]
    if done:
        log(
            f"resuming: {len(done)} of {len(plan.shards)} shards already finished"
            + (" and verified by sha256" if verify else " (sizes checked; --verify also checks sha256)")
        )
    if recipe.input_scales:
        log(f"input scales: from the reference for {len(plan.quantized) - len(summary.input_scales_missing)} modules")
    elif not weight_only:
        log(
            "note: activation scales are not calibrated: every input_scale is 1.0 (NVIDIA's calibration-free "
            "W4A4 recipe); use --weight_only for W4A16"
        )

    started = time.monotonic()
    codec = select_codec(dev)
    log(f"codec: {codec.name}" + (f", {cpu_kernel.threads()} threads" if "CPU kernel" in codec.name else ""))
    stats = Throughput()
    meter = Progress(sum(s.input_bytes for s in todo), mode=progress if rank == 0 else "none", log=log)
    try:
        with TensorReader(input_dir) as reader:
            kw = dict(device=dev, codec=codec, recipe=recipe, allow_nonfinite=allow_nonfinite, meter=meter, stats=stats)
            kw["reciprocals"] = ExactReciprocals()
            if world == 1:
                _write_shards_streaming(todo, state, reader, **kw)
            else:
                _write_shards_distributed(todo, state, reader, rank, world, **kw)
    except OSError as e:
        where = e.filename or output_dir
        raise OutputError(
            f"writing {where} failed: {e.strerror or e}; finished shards are kept, free the space "
            "or fix the cause and rerun with --resume"
        ) from None
    except IncompleteShardError as e:
        raise OutputError(f"{e}; rerun with --resume") from None
    finally:
        meter.close()
    if rank == 0:
        try:
            _export(plan, index, input_dir, output_dir, state, fp, exclude_modules, summary, recipe)
        except OSError as e:
            raise OutputError(
                f"writing {e.filename or output_dir} failed: {e.strerror or e}; rerun with --resume"
            ) from None
    _checkpoint(rank, world, "export", GROUP_TIMEOUT_S)
    summary.seconds = time.monotonic() - started
    summary.stages = stats.line()
    return summary


def _silent(*_args) -> None:
    pass


def zero_weight_modules(plan: Plan, output_dir: Path) -> list[str]:
    """Quantized modules whose source weight, or whole fused group, was all zeros, read back from the written
    shards (so a resumed or torchrun run reports the same list): the zero-weight global scale, and every
    code of the unit 0. A group with amax > 0 always has a nonzero code (its largest value encodes as 6)."""
    zero = []
    with TensorReader(output_dir) as reader:
        for shard in plan.shards:
            header, data_start = read_header(output_dir / shard.file)
            infos = {}
            for name, e in header.items():
                begin, end = (data_start + o for o in e["data_offsets"])
                infos[name] = TensorInfo(name, e["dtype"], tuple(e["shape"]), shard.file, begin, end)
            for unit in shard.units:
                if not isinstance(unit, QuantizeUnit):
                    continue
                names = unit.encoded_names()
                if all(reader.read(infos[s2]).item() == nvfp4.ZERO_WEIGHT_SCALE_2 for _, _, s2 in names) and all(
                    not reader.read(infos[packed]).any() for _, packed, _ in names
                ):
                    zero += [module for module, _, _ in names]
    return sorted(zero)


def _export(
    plan: Plan,
    index: CheckpointIndex,
    input_dir: Path,
    output_dir: Path,
    state: OutputState,
    fp: dict,
    exclude_modules: list[str],
    summary: Summary,
    recipe: Recipe,
) -> None:
    """Index, side files, configs and provenance, from what was written; the finished marker last."""
    weight_map = plan.weight_map()
    total_size = sum(t.nbytes for s in plan.shards for t in s.outputs)
    write_json_atomic(output_dir / INDEX_FILE, safetensors_index(weight_map, total_size))
    copied = copy_side_files(input_dir, output_dir)
    if recipe.format == COMPRESSED_TENSORS:
        config = ct_model_config(index.config, exclude_modules, recipe.weight_only)
    else:
        config = model_config(index.config, exclude_modules, recipe.weight_only)
        write_json_atomic(output_dir / "config.json", config)
    shards = state.finish(fp, [s.file for s in plan.shards])
    ct = recipe.format == COMPRESSED_TENSORS
    summary.zero_weights = zero_weight_modules(plan, output_dir)
    # Nothing here depends on the device, the number of workers or the time: the same input and options
    # give the same bytes in this file too.
    write_json_atomic(
        output_dir / PROVENANCE_FILE,
        {
            "tool": "modelopt-streaming",
            "version": __version__,
            "options": _recipe_dict(recipe),
            "source": {"files": index.file_sizes},
            "counts": {
                "quantized_weights": summary.quantized_weights,
                "quantized_by_kind": summary.quantized_by_kind,
                "fused_groups": summary.fused_groups,
                "copied_tensors": summary.copied_tensors,
                "unquantized_by_reason": summary.unquantized_by_reason,
                "zero_weights": len(summary.zero_weights),
            },
            "unquantized": plan.unquantized,
            "zero_weights": summary.zero_weights,
            "side_files": copied,
            "shards": [{k: r[k] for k in ("file", "size", "sha256")} for r in shards],
            "warnings": plan.warnings,
        }
        | ({RECORD_KEY: dict(sorted(kv for r in shards for kv in r.get(RECORD_KEY, {}).items()))} if ct else {}),
    )
    if recipe.format == COMPRESSED_TENSORS:
        # No hf_quant_config.json in this dialect: config.json is what consumers read, so it comes last.
        write_json_atomic(output_dir / "config.json", config)
    else:
        write_json_atomic(output_dir / FINISHED_MARKER, hf_quant_config(exclude_modules, recipe.weight_only))
