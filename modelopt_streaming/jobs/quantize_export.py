"""Export of a quantize run: the index, side files, configs and provenance of the output directory, from
the shards that were written (read back where they hold the answer); the finished marker last."""

from __future__ import annotations

from pathlib import Path

from modelopt_streaming.codec import nvfp4
from modelopt_streaming.formats.interchange import COMPRESSED_TENSORS, PROVENANCE_FILE, RECORD_KEY
from modelopt_streaming.jobs.quantize_job import QuantizeJob
from modelopt_streaming.plan.build import Plan, QuantizeUnit
from modelopt_streaming.sink.export.compressed_tensors_format import model_config as ct_model_config
from modelopt_streaming.sink.export.modelopt_format import hf_quant_config, model_config, safetensors_index
from modelopt_streaming.sink.export.provenance import provenance
from modelopt_streaming.sink.export.side_files import copy_side_files
from modelopt_streaming.sink.output_dir import FINISHED_MARKER, recipe_dict
from modelopt_streaming.sink.writer import write_json_atomic
from modelopt_streaming.source.index import INDEX_FILE, shard_tensors
from modelopt_streaming.source.reader import TensorReader

__all__ = ["export_checkpoint", "zero_weight_modules"]


def zero_weight_modules(plan: Plan, output_dir: Path) -> list[str]:
    """Quantized modules whose source weight, or whole fused group, was all zeros, read back from the written
    shards (so a resumed or torchrun run reports the same list): the zero-weight global scale, and every
    code of the unit 0. A group with amax > 0 always has a nonzero code (its largest value encodes as 6)."""
    zero = []
    with TensorReader(output_dir) as reader:
        for shard in plan.shards:
            infos = shard_tensors(output_dir, shard.file)
            for unit in shard.units:
                if not isinstance(unit, QuantizeUnit):
                    continue
                names = unit.encoded_names()
                if all(reader.read(infos[s2]).item() == nvfp4.ZERO_WEIGHT_SCALE_2 for _, _, s2 in names) and all(
                    not reader.read(infos[packed]).any() for _, packed, _ in names
                ):
                    zero += [module for module, _, _ in names]
    return sorted(zero)


def export_checkpoint(job: QuantizeJob) -> list[str]:
    """Index, side files, configs and provenance, from what was written; the finished marker last.

    Returns:
        The all-zero quantized modules (``zero_weight_modules``), which the provenance lists too.
    """
    plan, recipe, summary, output_dir = job.plan, job.recipe, job.summary, job.output_dir
    ct = recipe.format == COMPRESSED_TENSORS
    weight_map = plan.weight_map()
    total_size = sum(t.nbytes for s in plan.shards for t in s.outputs)
    write_json_atomic(output_dir / INDEX_FILE, safetensors_index(weight_map, total_size))
    copied = copy_side_files(job.input_dir, output_dir)
    if ct:
        config = ct_model_config(job.index.config, job.exclude_modules, recipe.weight_only)
    else:
        config = model_config(job.index.config, job.exclude_modules, recipe.weight_only, recipe.kv_cache)
        write_json_atomic(output_dir / "config.json", config)
    shards = job.state.finish(job.fingerprint, [s.file for s in plan.shards])
    zero_weights = zero_weight_modules(plan, output_dir)
    counts = {
        "quantized_weights": summary.quantized_weights,
        "quantized_by_kind": summary.quantized_by_kind,
        "fused_groups": summary.fused_groups,
        "copied_tensors": summary.copied_tensors,
        "unquantized_by_reason": summary.unquantized_by_reason,
        "zero_weights": len(zero_weights),
    }
    trailer: dict = {"warnings": plan.warnings}
    if ct:
        trailer[RECORD_KEY] = dict(sorted(kv for r in shards for kv in r.get(RECORD_KEY, {}).items()))
    # Nothing here depends on the device, the number of workers or the time: the same input and options
    # give the same bytes in this file too.
    record = provenance(
        command=None,
        options=recipe_dict(recipe),
        source={"files": job.index.file_sizes},
        details={
            "counts": counts,
            "unquantized": plan.unquantized,
            "zero_weights": zero_weights,
            **({"calibration": summary.calibration} if summary.calibration else {}),
        },
        side_files=copied,
        shards=shards,
        trailer=trailer,
    )
    write_json_atomic(output_dir / PROVENANCE_FILE, record)
    if ct:
        # No hf_quant_config.json in this dialect: config.json is what consumers read, so it comes last.
        write_json_atomic(output_dir / "config.json", config)
    else:
        config = hf_quant_config(job.exclude_modules, recipe.weight_only, recipe.kv_cache)
        write_json_atomic(output_dir / FINISHED_MARKER, config)
    return zero_weights
