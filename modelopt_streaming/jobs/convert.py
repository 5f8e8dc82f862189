"""``convert``: an NVFP4 checkpoint from one dialect to the other, losslessly, streaming.

Same codes, same block scales, other names, reciprocal global scales, the other config; nothing is
requantized. Each source shard becomes one output shard of the same name with its tensors in the same
order, copied in bounded chunks, so memory stays constant whatever the size. The output directory follows
quantize's rules (temporary names, per-shard records, ``--resume``, one run at a time).

The source is validated first. Fused members (q/k/v, gate/up, ...) whose global or input scales differ
cannot be served right by either consumer: vLLM's ModelOpt path keeps one global scale per fused layer
(spec section 3), and its compressed-tensors path takes the ``max`` of the members' divisors and warns
(``compressed_tensors/schemes/compressed_tensors_w4a4_nvfp4.py``
``CompressedTensorsW4A4Fp4.process_weights_after_loading``). Such a checkpoint is refused with the list of
those groups; ``force`` converts it unchanged, and ``validate`` of the output reports the same groups.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelopt_streaming.errors import CheckpointError, ConversionRefused, UsageError
from modelopt_streaming.formats.interchange import (
    COMPRESSED_TENSORS,
    EXPERTS_3D_SUFFIXES,
    FORMATS,
    LEAVES,
    MODELOPT,
    PROVENANCE_FILE,
    RECORD_KEY,
    SCALAR_SHAPE,
    ExactReciprocals,
)
from modelopt_streaming.jobs.shard_copy import write_shards_in_order
from modelopt_streaming.sink.export import compact_exclusions, copy_side_files, hf_quant_config, safetensors_index
from modelopt_streaming.sink.export import model_config as modelopt_model_config
from modelopt_streaming.sink.export.compressed_tensors_format import compressed_tensors_ignore
from modelopt_streaming.sink.export.compressed_tensors_format import model_config as ct_model_config
from modelopt_streaming.sink.export.provenance import provenance
from modelopt_streaming.sink.output_dir import (
    FINISHED_MARKER,
    OutputState,
    check_paths,
    job_fingerprint,
    single_process_job,
)
from modelopt_streaming.sink.writer import write_json_atomic
from modelopt_streaming.source.hub_cache import resolve_checkpoint_dir
from modelopt_streaming.source.index import (
    FLOAT_DTYPES,
    INDEX_FILE,
    CheckpointIndex,
    TensorInfo,
    TensorSpec,
    build_index,
)
from modelopt_streaming.source.quantized import load_exact_reciprocals, nvfp4_modules, read_positive_scalar
from modelopt_streaming.source.reader import TensorReader
from modelopt_streaming.validate import validate

__all__ = ["ConvertSummary", "convert", "linear_modules", "plan_conversion", "quantized_experts_3d"]

# Checks whose errors mean the files cannot be read as the format they claim: nothing to convert.
_BLOCKING_CHECKS = ("format", "shards", "index", "tensors")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """One output tensor: the source tensor's bytes under a new name, or (``reciprocal``) a scalar."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo
    reciprocal: float | None = None

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


@dataclass
class ConvertSummary:
    input_dir: str
    output_dir: str
    source_format: str
    target_format: str
    quantized_modules: int
    tensors: int
    renamed: int
    reciprocals: int
    exact_reciprocals: int
    weight_only: bool
    exclusions: list[str] = field(default_factory=list)
    forced_groups: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output_findings: list[str] = field(default_factory=list)
    # Errors validate found in the source that do not stop a conversion (its exclude list, say): the output
    # may repeat them, and that alone is no failure of the conversion.
    source_errors: int = 0
    restored_configs: bool = False
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """The output does not validate although the source did (apart from groups converted with force)."""
        return bool(self.output_findings) and not self.source_errors and not self.forced_groups

    def lines(self) -> list[str]:
        out = [
            f"{self.source_format} -> {self.target_format}: {self.quantized_modules} quantized modules, "
            f"{self.tensors} tensors ({self.renamed} renamed, {self.reciprocals} scales inverted)",
            f"{'ignore' if self.target_format == COMPRESSED_TENSORS else 'exclude_modules'}: "
            f"{len(self.exclusions)} entries",
        ]
        if self.exact_reciprocals:
            out.append(
                f"{self.exact_reciprocals} inverted scales do not invert back in float32: their source values "
                f"are kept in {PROVENANCE_FILE} ({RECORD_KEY}), so converting back is exact"
            )
        if self.restored_configs:
            out.append(f"configs: the {self.target_format} configs this checkpoint was converted from, restored")
        if self.forced_groups:
            out.append(f"converted with --force: {len(self.forced_groups)} fused group(s) with different scales:")
            out += [f"  {g}" for g in self.forced_groups]
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"output: {f}" for f in self.output_findings]
        if self.seconds:
            out.append(f"time: {self.seconds:.1f} s")
        return out

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def linear_modules(tensors: dict[str, TensorInfo]) -> list[str]:
    """Every module with a weight of two or more dims, named as the plan names them (``X`` for ``X.weight``
    or ``X.weight_packed``, the tensor name of 3-D fused experts and of other float tensors that are not
    ``.weight``), quantized or not."""
    out = set()
    quant_leaves = {leaf for leaves in LEAVES.values() for leaf in leaves.values()}
    for name, info in tensors.items():
        module, _, leaf = name.rpartition(".")
        if len(info.shape) < 2:
            continue
        if leaf in ("weight", "weight_packed"):
            out.add(module)
        elif leaf in quant_leaves or name.endswith(("bias", *EXPERTS_3D_SUFFIXES.values())):
            continue
        elif info.dtype in FLOAT_DTYPES or (info.dtype == "U8" and len(info.shape) == 3):
            out.add(name)
    return sorted(out)


def quantized_experts_3d(tensors: dict[str, TensorInfo]) -> list[str]:
    """ModelOpt 0.47's 3-D fused experts: X uint8 [E, in/2, out] with ``X_weight_scale``."""
    return sorted(
        n
        for n, i in tensors.items()
        if i.dtype == "U8" and len(i.shape) == 3 and n + EXPERTS_3D_SUFFIXES["weight_scale"] in tensors
    )


def plan_conversion(
    index: CheckpointIndex, source: str, target: str, reciprocals: ExactReciprocals, reader: TensorReader
) -> dict[str, list[Output]]:
    """Output tensors of each shard, in the source order; reads only the scalar global and input scales."""
    modules = nvfp4_modules(index.tensors, source)
    src, dst = LEAVES[source], LEAVES[target]
    renames: dict[str, tuple[str, bool]] = {}  # source tensor -> (output name, reciprocal)
    for module, roles in modules.items():
        for role, info in roles.items():
            renames[info.name] = (f"{module}.{dst[role]}", role in ("global", "input"))
        missing = [src[r] for r in ("weight_scale", "global") if r not in roles]
        if missing:
            info = roles["weight"]
            raise CheckpointError(
                f"{index.root / info.file}, tensor {info.name!r}: packed NVFP4 weight without {module}.{missing[0]}"
            )
    shards: dict[str, list[Output]] = {}
    for info in sorted(index.tensors.values(), key=lambda t: (t.file, t.begin)):
        new_name, inverted = renames.get(info.name, (info.name, False))
        if not inverted:
            shards.setdefault(info.file, []).append(Output(new_name, info.dtype, info.shape, info))
            continue
        out = reciprocals.convert(info.name, read_positive_scalar(reader, info), new_name)
        shards.setdefault(info.file, []).append(Output(new_name, "F32", SCALAR_SHAPE[target], info, out))
    for file in index.files:
        shards.setdefault(file, [])
    return {f: shards[f] for f in index.files}


SOURCE_CONFIGS_KEY = "source_configs"


def source_configs(input_dir: Path, config: dict, fmt: str, quantized: set[str], weight_only: bool) -> dict:
    """The source's quantization configs, kept in the output's provenance: converting back to ``fmt`` restores
    them as they were (another producer's exclude list and metadata) instead of deriving new ones, as long as
    the same modules are quantized the same way."""
    hf_path = input_dir / FINISHED_MARKER
    try:
        hf_quant = json.loads(hf_path.read_text(encoding="utf-8")) if hf_path.is_file() else None
    except (OSError, ValueError):
        hf_quant = None  # validate has said why; nothing to restore
    return {
        "format": fmt,
        "quantized_sha256": hashlib.sha256(json.dumps([sorted(quantized), weight_only]).encode()).hexdigest(),
        "quantization_config": config.get("quantization_config"),
        "config_keys": list(config),
        "hf_quant_config": hf_quant,
    }


def restorable_configs(input_dir: Path, to: str, quantized_sha256: str) -> dict | None:
    """The configs recorded by the conversion that made ``input_dir``, if they describe ``to`` and these tensors."""
    path = input_dir / PROVENANCE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8")).get(SOURCE_CONFIGS_KEY) if path.is_file() else None
    except (ValueError, AttributeError):
        return None
    if not isinstance(record, dict) or record.get("format") != to or record.get("quantized_sha256") != quantized_sha256:
        return None
    return record


def _fused_scale_groups(report) -> list[str]:
    groups = []
    for kind, g in sorted(report.groups.items()):
        groups += [f"{kind} {m}" for m in g.mismatched]
        groups += [f"{kind} {p}: input scales differ" for p in g.input_mismatched]
    return groups


def convert(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    to: str,
    *,
    force: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    verify: bool = False,
) -> ConvertSummary:
    """Convert an NVFP4 checkpoint (ModelOpt or compressed-tensors ``nvfp4-pack-quantized``) to the other
    dialect: same codes and block scales, renamed tensors, reciprocal global and input scales, the other
    config. Warnings go to the ``modelopt_streaming`` logger.

    Args:
        input_dir: the NVFP4 checkpoint, or a Hub id already in the local cache.
        output_dir: where the converted checkpoint goes (empty, or an earlier output with ``overwrite``).
        to: the target dialect, ``"modelopt"`` or ``"compressed-tensors"``.
        force: convert fused groups whose members carry different scales unchanged instead of refusing.
        overwrite: replace an earlier output of this tool.
        resume: continue an interrupted run in the same output directory.
        verify: with ``resume``, check finished shards by digest.

    Returns:
        The summary, with what ``validate`` finds wrong in the output (``failed`` tells whether that is the
        conversion's fault).

    Raises:
        UsageError: bad options, paths, or a source already in the ``to`` dialect.
        ConversionRefused: the source is no readable NVFP4 checkpoint, or cannot be converted exactly.
        ConsumerError: no exclude list describes the source's quantized modules for vLLM.
        CheckpointError: a tensor of the source cannot be read or is inconsistent.
        OutputStateError: the output directory cannot be used.
    """
    if to not in FORMATS:
        raise UsageError(f"--to must be one of {', '.join(FORMATS)}, not {to!r}")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    input_dir = resolve_checkpoint_dir(input_dir)
    output_dir = Path(output_dir)
    check_paths(input_dir, output_dir)
    started = time.monotonic()
    before = validate(input_dir, block_scales=False)
    errors = [f for f in before.findings if f.level == "error"]
    blocking = [f for f in errors if f.check in _BLOCKING_CHECKS]
    if before.format is None or blocking:
        first = blocking[0].message if blocking else "not an NVFP4 checkpoint"
        raise ConversionRefused(f"{input_dir}: cannot be converted: {first}")
    source = before.format
    if source == to:
        raise UsageError(f"{input_dir} is already in the {to} format")
    index = build_index(input_dir)
    experts_3d = quantized_experts_3d(index.tensors)
    if experts_3d and to == COMPRESSED_TENSORS:
        raise ConversionRefused(
            f"{input_dir}: 3-D fused experts ({experts_3d[0]}) have no compressed-tensors form; "
            "compressed-tensors quantizes Linear modules"
        )
    forced = _fused_scale_groups(before)
    if forced and not force:
        shown = "\n  ".join(forced)
        raise ConversionRefused(
            f"{input_dir}: {len(forced)} fused group(s) whose members carry different scales; vLLM uses one "
            f"scale per fused layer, so neither format serves them right (use --force to convert unchanged):\n"
            f"  {shown}"
        )
    warnings = [f"source: {f.message}" for f in errors if f.check not in _BLOCKING_CHECKS and f.check != "fused"]
    quant = source_configs(input_dir, index.config, source, set(), False)["hf_quant_config"]
    quant = quant.get("quantization") if isinstance(quant, dict) else None
    kv = quant.get("kv_cache_quant_algo") if isinstance(quant, dict) else None
    if kv and to == COMPRESSED_TENSORS:
        # Not converted: compressed-tensors describes KV-cache quantization with its own kv_cache_scheme.
        warnings.append(f"source declares KV-cache quantization {kv!r}: its k/v scales are copied, not described")
    for w in warnings:
        _log.warning(f"warning: {w}")

    reciprocals = ExactReciprocals(load_exact_reciprocals(input_dir))
    with TensorReader(input_dir) as reader:
        shards = plan_conversion(index, source, to, reciprocals, reader)
    modules = nvfp4_modules(index.tensors, source)
    weight_only = not any("input" in roles for roles in modules.values())
    quantized = set(modules) | set(experts_3d)
    linear = linear_modules(index.tensors)
    unquantized = sorted(set(linear) - quantized)
    # A fused layer with quantized and unquantized members raises ConsumerError: no list describes it.
    if to == MODELOPT:
        exclusions = compact_exclusions(unquantized, linear, index.config)
    else:
        exclusions = compressed_tensors_ignore(unquantized, linear, index.config)
    configs = source_configs(input_dir, index.config, source, quantized, weight_only)
    restored = restorable_configs(input_dir, to, configs["quantized_sha256"])
    if restored is not None:
        qc = restored["quantization_config"] or {}
        hf = (restored["hf_quant_config"] or {}).get("quantization") or {}
        exclusions = list(hf.get("exclude_modules") or qc.get("ignore") or [])
    outputs = [o for outs in shards.values() for o in outs]
    summary = ConvertSummary(
        input_dir=str(input_dir),
        output_dir=str(output_dir),
        source_format=source,
        target_format=to,
        quantized_modules=len(quantized),
        tensors=len(outputs),
        renamed=sum(o.name != o.source.name for o in outputs),
        reciprocals=sum(o.reciprocal is not None for o in outputs),
        exact_reciprocals=len(reciprocals.record),
        weight_only=weight_only,
        exclusions=exclusions,
        forced_groups=forced,
        warnings=warnings,
        source_errors=len(errors),
        restored_configs=restored is not None,
    )
    planned = {f: [o.name for o in outs] for f, outs in shards.items()}
    layout = [[f, [(o.name, o.reciprocal) for o in outs]] for f, outs in shards.items()]
    fingerprint = job_fingerprint("convert", index, {"to": to, "force": force}, layout)
    with single_process_job(
        output_dir, fingerprint, planned, resume=resume, verify=verify, overwrite=overwrite, source_dir=input_dir
    ) as (state, done):
        write_shards_in_order(input_dir, state, [(f, o) for f, o in shards.items() if f not in done], _content)
        conversion = _Conversion(
            index, input_dir, output_dir, fingerprint, shards, summary, reciprocals, configs, restored
        )
        _export(conversion, state)
    after = validate(output_dir, block_scales=False)
    summary.output_findings = [f"{f.level}: [{f.check}] {f.message}" for f in after.findings if f.level == "error"]
    summary.seconds = time.monotonic() - started
    return summary


def _content(output: Output, reader: TensorReader) -> torch.Tensor | TensorInfo:
    """An inverted scale as its new tensor; any other output is its source's bytes."""
    if output.reciprocal is not None:
        return torch.tensor(output.reciprocal, dtype=torch.float32).reshape(output.shape)
    return output.source


@dataclass(frozen=True)
class _Conversion:
    """A conversion once planned: what its export writes from, besides the output directory's state."""

    index: CheckpointIndex
    input_dir: Path
    output_dir: Path
    fingerprint: dict
    shards: dict[str, list[Output]]
    summary: ConvertSummary
    reciprocals: ExactReciprocals
    # The source's own configs, recorded in the provenance (source_configs), and those of the target format
    # this checkpoint was converted from, when converting back restores them (restorable_configs).
    configs: dict
    restored: dict | None


def _export(conversion: _Conversion, state: OutputState) -> None:
    """Index, side files, provenance, then the config the consumers read: written last, so that an
    unfinished directory never looks loadable."""
    c, summary, output_dir = conversion, conversion.summary, conversion.output_dir
    config_of = c.index.config
    weight_map = {o.name: f for f, outs in c.shards.items() for o in outs}
    total = sum(o.spec.nbytes for outs in c.shards.values() for o in outs)
    write_json_atomic(output_dir / INDEX_FILE, safetensors_index(weight_map, total))
    copied = copy_side_files(c.input_dir, output_dir)
    records = state.finish(c.fingerprint, list(c.shards))
    record = provenance(
        command="convert",
        options=c.fingerprint["options"],
        source={"format": summary.source_format, "files": c.index.file_sizes},
        details={
            "forced_groups": summary.forced_groups,
            RECORD_KEY: c.reciprocals.as_json(),
            SOURCE_CONFIGS_KEY: c.configs,
        },
        side_files=copied,
        shards=records,
    )
    write_json_atomic(output_dir / PROVENANCE_FILE, record)
    restored = c.restored
    if restored is not None:
        # Converting back: the configs the checkpoint had in this format, as they were.
        config = copy.deepcopy(config_of)
        config.pop("quantization_config", None)
        if restored["quantization_config"] is not None:
            config["quantization_config"] = restored["quantization_config"]
        config = {k: config[k] for k in restored["config_keys"] if k in config} | config
        write_json_atomic(output_dir / "config.json", config)
        if restored["hf_quant_config"] is not None:
            write_json_atomic(output_dir / FINISHED_MARKER, restored["hf_quant_config"])
    elif summary.target_format == MODELOPT:
        config = modelopt_model_config(config_of, summary.exclusions, summary.weight_only)
        write_json_atomic(output_dir / "config.json", config)
        write_json_atomic(output_dir / FINISHED_MARKER, hf_quant_config(summary.exclusions, summary.weight_only))
    else:
        write_json_atomic(
            output_dir / "config.json", ct_model_config(config_of, summary.exclusions, summary.weight_only)
        )
