"""``modelopt-streaming validate``: every rule of the NVFP4 formats, checked on the files alone."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

from modelopt_streaming.consumers import (
    GENERIC,
    UNFUSED,
    ExclusionMatcher,
    VllmExclusion,
    consumer_layers,
    disagreements,
    family_of,
)
from modelopt_streaming.formats.names import experts_of, is_embedding
from modelopt_streaming.plan.names import FUSION_KINDS, fusion_key
from modelopt_streaming.validate.checkpoint import COMPRESSED_TENSORS, MODELOPT, ModuleView, NVFP4Checkpoint
from modelopt_streaming.validate.report import GroupStats, Report

# Row-parallel layers: vLLM splits their input dim across tensor-parallel ranks.
_ROW_PARALLEL = {"down_proj", "o_proj", "w2", "dense_4h_to_h", "out_proj"}
_REQUIRED_HF_KEYS = ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules")


def _fusion_groups(names: list[str]) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in names:
        key = fusion_key(name)
        if key:
            groups[key].append(name)
    order = list(FUSION_KINDS)
    return {k: sorted(v, key=lambda m: order.index(m.rpartition(".")[2])) for k, v in groups.items() if len(v) >= 2}


def _check_configs(ck: NVFP4Checkpoint) -> tuple[str | None, list[str] | None, bool | None]:
    """Returns (quant_algo, exclude list, input scales expected) and records config findings."""
    if ck.format == MODELOPT:
        hf = ck.hf_quant_config
        qc = ck.quant_config
        quant = (hf or {}).get("quantization") if hf else None
        if hf is None:
            source = qc
            algo, exclude = qc.get("quant_algo"), qc.get("ignore")
        else:
            if not isinstance(quant, dict):
                ck.error("config", "hf_quant_config.json has no 'quantization' section")
                return None, None, None
            for key in _REQUIRED_HF_KEYS:
                if key not in quant:
                    ck.error("config", f"hf_quant_config.json lacks required key quantization.{key} (vLLM refuses it)")
            source = quant
            algo, exclude = quant.get("quant_algo"), quant.get("exclude_modules")
            if qc:
                if qc.get("quant_method") != "modelopt":
                    ck.error(
                        "config",
                        f"config.json carries a stale quantization_config (quant_method "
                        f"{qc.get('quant_method')!r}); vLLM reads it before hf_quant_config.json",
                    )
                else:
                    if qc.get("quant_algo") != algo:
                        ck.error(
                            "config",
                            f"config.json quant_algo {qc.get('quant_algo')!r} disagrees with "
                            f"hf_quant_config.json {algo!r}",
                        )
                    if sorted(qc.get("ignore") or []) != sorted(exclude or []):
                        ck.error(
                            "config",
                            "config.json quantization_config.ignore differs from hf_quant_config.json exclude_modules",
                        )
        if algo not in ("NVFP4", "W4A16_NVFP4"):
            ck.error("config", f"quant_algo is {algo!r}, not NVFP4 or W4A16_NVFP4")
        if source.get("group_size", 16) != 16:
            ck.error("config", f"group_size is {source.get('group_size')!r}, NVFP4 needs 16")
        return algo, list(exclude or []), algo == "NVFP4"
    if ck.format == COMPRESSED_TENSORS:
        qc = ck.quant_config
        if qc.get("format") != "nvfp4-pack-quantized":
            ck.error("config", f"compressed-tensors format is {qc.get('format')!r}, not nvfp4-pack-quantized")
        if qc.get("quantization_status") not in (None, "compressed"):
            ck.error("config", f"quantization_status is {qc.get('quantization_status')!r}, not compressed")
        groups = qc.get("config_groups") or {}
        inputs = None
        for name, group in groups.items():
            w = (group or {}).get("weights") or {}
            if w.get("num_bits") != 4 or w.get("type") != "float" or w.get("group_size") != 16:
                ck.error("config", f"config_groups.{name}.weights is not NVFP4 (num_bits 4, type float, group 16)")
            inputs = bool((group or {}).get("input_activations")) if inputs is None else inputs
        algo = "NVFP4" if inputs else "NVFP4A16"
        return algo, list(qc.get("ignore") or []), bool(inputs)
    return None, None, None


def _check_module(ck: NVFP4Checkpoint, v: ModuleView, inputs_expected: bool | None) -> None:
    ct = ck.format == COMPRESSED_TENSORS
    gname = "weight_global_scale" if ct else "weight_scale_2"
    iname = "input_global_scale" if ct else "input_scale"
    for extra in v.extra:
        ck.error("tensors", f"{extra.name}: unexpected tensor for module {v.name}")
    if not v.quantized:
        for attr, label in (("weight_scale", "weight_scale"), ("global_scale", gname), ("input_scale", iname)):
            if getattr(v, attr) is not None:
                what = "has no weight" if v.weight is None else f"keeps its {v.weight.dtype} weight"
                ck.error("tensors", f"{v.name}.{label}: scale tensor for a module that {what}")
        return
    if v.experts_3d:
        _check_experts_3d(ck, v)
    elif len(v.weight.shape) != 2:
        ck.error("tensors", f"{v.weight.name}: packed weight must be 2-D, is {list(v.weight.shape)}")
        return
    else:
        out, packed_cols = v.weight.shape
        if v.weight_scale is None:
            ck.error("tensors", f"{v.name}.weight_scale is missing")
        elif v.weight_scale.dtype != "F8_E4M3" or v.weight_scale.shape != (out, packed_cols * 2 // 16):
            ck.error(
                "tensors",
                f"{v.weight_scale.name}: {v.weight_scale.dtype} {list(v.weight_scale.shape)}, expected "
                f"F8_E4M3 {[out, packed_cols * 2 // 16]}",
            )
    if v.global_scale is None:
        ck.error("tensors", f"{v.name}.{gname} is missing")
    elif v.global_scale.dtype != "F32" or v.global_scale.numel != 1:
        ck.error(
            "tensors",
            f"{v.global_scale.name}: {v.global_scale.dtype} {list(v.global_scale.shape)}, expected a float32 scalar",
        )
    else:
        value = float(ck.read(v.global_scale).float().reshape(()))
        if not (math.isfinite(value) and value > 0):
            ck.error("values", f"{v.global_scale.name} = {value}: must be finite and > 0")
    if inputs_expected and v.input_scale is None:
        ck.error("tensors", f"{v.name}.{iname} is missing: vLLM loads it as zero and returns NaN for some prompts")
    elif inputs_expected is False and v.input_scale is not None:
        ck.error("tensors", f"{v.input_scale.name}: input scale in a weight-only checkpoint")
    if v.input_scale is not None and v.input_scale.dtype == "F32" and v.input_scale.numel == 1:
        value = float(ck.read(v.input_scale).float().reshape(()))
        if not (math.isfinite(value) and value > 0):
            ck.error("values", f"{v.input_scale.name} = {value}: must be finite and > 0")


def _check_experts_3d(ck: NVFP4Checkpoint, v: ModuleView) -> None:
    """ModelOpt 0.47's layout of 3-D fused experts: X uint8 [E, in/2, out], X_weight_scale [E, in/16, out]."""
    n_exp, half_in, n_out = v.weight.shape
    expected = (n_exp, half_in * 2 // 16, n_out)
    if v.weight_scale is None:
        ck.error("tensors", f"{v.name}_weight_scale is missing")
    elif v.weight_scale.dtype != "F8_E4M3" or v.weight_scale.shape != expected:
        ck.error(
            "tensors",
            f"{v.weight_scale.name}: {v.weight_scale.dtype} {list(v.weight_scale.shape)}, expected "
            f"F8_E4M3 {list(expected)}",
        )


def _check_consumer(ck: NVFP4Checkpoint, hf_exclude: list[str], modules: list[ModuleView]) -> None:
    """Every layer vLLM builds: its decision (NVFP4 or not), read from the list the way vLLM reads it for
    this architecture (``consumers``), must agree with the tensors."""
    qc = ck.quant_config
    # vLLM reads config.json's quantization_config before hf_quant_config.json (get_quant_config in
    # model_loader/weight_utils.py), so its ``ignore`` is the list that counts when both exist.
    exclude = list(qc.get("ignore") or []) if qc.get("quant_method") == "modelopt" else hf_exclude
    config = ck.config or {}
    family = family_of(config)
    readings = [family] if family else [GENERIC, UNFUSED]
    if family is None:
        archs = ", ".join(config.get("architectures") or []) or config.get("model_type") or "unknown"
        ck.warning(
            "consumer",
            f"architecture {archs} is not in the consumer table: exclusions judged under both the fused and "
            "the unfused reading of vLLM's usual layer names",
        )
    # Linear weights (2-D) and 3-D fused experts: what vLLM builds as layers that can be NVFP4.
    state = {
        v.name: v.quantized for v in modules if v.weight is not None and (len(v.weight.shape) == 2 or v.experts_3d)
    }
    reported: set[str] = set()
    for fam in readings:
        layers = consumer_layers(state, config, fam)
        for d in disagreements(layers, state.__getitem__, VllmExclusion(exclude, fam, config)):
            if d.tensors_quantized is None or d.layer.prefix in reported:
                continue  # a partly quantized fused or MoE layer is reported by the fused checks
            reported.add(d.layer.prefix)
            ck.error("consumer", d.message())


def _scan_block_scales(ck: NVFP4Checkpoint, modules: list[ModuleView]) -> dict[str, int]:
    total = zero = nan = 0
    first_nan = None
    for v in modules:
        if v.weight_scale is None or v.weight_scale.dtype != "F8_E4M3":
            continue
        raw = ck.read(v.weight_scale).view(torch.uint8).reshape(-1)
        mag = raw & 0x7F
        total += raw.numel()
        zero += int((mag == 0).sum())
        n = int((mag == 0x7F).sum())
        nan += n
        if n and first_nan is None:
            first_nan = v.weight_scale.name
    if nan:
        ck.error("values", f"{nan} NaN fp8 block scales (first in {first_nan})")
    if zero:
        ck.warning("values", f"{zero} zero fp8 block scales: those blocks dequantize to zero")
    return {"total": total, "zero": zero, "nan": nan}


def validate(path: str | Path, tp: int | None = None, block_scales: bool = True) -> Report:
    """Judge an NVFP4 checkpoint (ModelOpt or compressed-tensors) from its files alone.

    Args:
        path: the checkpoint directory.
        tp: a tensor-parallel size to check row-parallel input dims against (per-rank multiples of 16).
        block_scales: read every fp8 block scale to count zeros and NaNs (reads all ``weight_scale`` data).

    Returns:
        The report; ``Report.ok`` is False when any check found an error. Problems in the headers, configs
        and index are findings in the report.

    Raises:
        CheckpointError: a tensor's bytes cannot be read (a shard ends before the data its header lists).
    """
    ck = NVFP4Checkpoint(path)
    try:
        return _validate(ck, tp, block_scales)
    finally:
        ck.close()


def _validate(ck: NVFP4Checkpoint, tp: int | None, block_scales: bool) -> Report:
    algo, exclude, inputs_expected = _check_configs(ck)
    modules = sorted(ck.modules.values(), key=lambda v: v.name)
    quantized = [v for v in modules if v.quantized]
    for v in modules:
        _check_module(ck, v, inputs_expected)
    linear_unquantized = [
        v.name
        for v in modules
        if not v.quantized and v.weight is not None and len(v.weight.shape) >= 2 and not is_embedding(v.name)
    ]
    if ck.format and not quantized:
        ck.error("tensors", "no quantized module found")

    # The config tells the truth: read the list the way vLLM does, over the layers vLLM builds.
    if exclude is not None and ck.format == MODELOPT:
        _check_consumer(ck, exclude, modules)
    elif exclude is not None:
        matcher = ExclusionMatcher(exclude)
        missing = [m for m in linear_unquantized if not matcher(m)]
        wrong = [v.name for v in quantized if matcher(v.name)]
        if missing:
            ck.error(
                "exclusions",
                f"{len(missing)} unquantized Linear module(s) not in the exclude list, vLLM will "
                f"expect NVFP4 tensors for them: {', '.join(missing[:5])}",
            )
        if wrong:
            ck.error(
                "exclusions",
                f"{len(wrong)} quantized module(s) matched by the exclude list, vLLM will load "
                f"them as unquantized: {', '.join(wrong[:5])}",
            )

    # Fused groups: bit-identical global and input scales.
    stats: dict[str, GroupStats] = {}
    by_name = ck.modules
    for (kind, parent), members in sorted(_fusion_groups([v.name for v in modules if v.weight is not None]).items()):
        q = [m for m in members if by_name[m].quantized]
        if q and len(q) < len(members):
            ck.error(
                "fused",
                f"{parent}: {kind} group partly quantized ({', '.join(q)} only); vLLM raises "
                "'Detected some but not all shards ... are quantized'",
            )
            continue
        if not q:
            continue
        g = stats.setdefault(kind, GroupStats(kind))
        g.total += 1
        bits = [ck.scalar_bits(by_name[m].global_scale) for m in members]
        if all(b == bits[0] and b is not None for b in bits):
            g.matched += 1
        else:
            g.mismatched.append(f"{parent}: " + ", ".join(m.rpartition(".")[2] for m in members))
            values = [ck.weight_scale_2(by_name[m]) for m in members]
            if all(values) and values[0]:
                g.ratios.append(values[1] / values[0])
        in_bits = [ck.scalar_bits(by_name[m].input_scale) for m in members]
        if len(set(in_bits)) > 1:
            g.input_mismatched.append(parent)
    for kind, g in stats.items():
        if g.matched < g.total:
            ck.error(
                "fused",
                f"{kind}: {g.total - g.matched}/{g.total} groups with different weight_scale_2, "
                f"first {g.mismatched[0]}",
            )
        if g.input_mismatched:
            ck.error(
                "fused",
                f"{kind}: input_scale differs within {len(g.input_mismatched)} group(s), first {g.input_mismatched[0]}",
            )

    # One MoE layer is quantized all or nothing in vLLM.
    layers: dict[str, set[bool]] = defaultdict(set)
    for v in modules:
        moe = experts_of(v.name)
        if moe and v.weight is not None:
            layers[moe].add(v.quantized)
    for moe, states in sorted(layers.items()):
        if len(states) > 1:
            block = moe.rpartition(".")[0]
            ck.error("fused", f"{block}: some routed experts quantized and some not; vLLM treats the MoE layer as one")

    _check_index(ck)
    _check_kv_cache(ck)
    row_parallel_in = {
        v.name: v.in_features for v in quantized if v.name.rpartition(".")[2] in _ROW_PARALLEL and v.in_features
    }
    scan = _scan_block_scales(ck, quantized) if block_scales else {}
    report = Report(
        path=str(ck.root),
        format=ck.format,
        quant_algo=algo,
        shards=len({t.file for t in ck.tensors.values()}),
        tensors=len(ck.tensors),
        quantized_modules=len(quantized),
        unquantized_linear=len(linear_unquantized),
        groups=stats,
        block_scales=scan,
        findings=ck.findings,
        row_parallel_in=row_parallel_in,
    )
    bad = report.tp_misfits(tp) if tp else []
    if bad:
        ck.error(
            "tp",
            f"{len(bad)} row-parallel module(s) whose input dim does not split into per-rank multiples of 16 "
            f"at tp {tp}, e.g. {bad[0]} (input dim {row_parallel_in[bad[0]]})",
        )
    return report


_KV_SCALE_LEAVES = (".k_proj.k_scale", ".v_proj.v_scale")


def _kv_cache_algo(ck: NVFP4Checkpoint) -> str | None:
    """ "FP8" when the config asks for an FP8 KV cache as vLLM reads it: config.json's ``kv_cache_scheme``
    first, then hf_quant_config.json's ``kv_cache_quant_algo`` (vllm/utils/torch_utils.py
    ``get_kv_cache_quant_algo_string``)."""
    scheme = (ck.quant_config or {}).get("kv_cache_scheme")
    if isinstance(scheme, dict):
        return "FP8" if scheme.get("type") == "float" and scheme.get("num_bits") == 8 else str(scheme)
    algo = ((ck.hf_quant_config or {}).get("quantization") or {}).get("kv_cache_quant_algo")
    return algo if algo else None


def _check_kv_cache(ck: NVFP4Checkpoint) -> None:
    """KV-cache scales, ModelOpt's names (``...self_attn.k_proj.k_scale``, ``...v_proj.v_scale``): with an
    FP8 KV cache, both of every attention layer or none (the constant-amax "cast" mode, where vLLM uses 1.0),
    each a float32 scalar, finite and > 0; without one, vLLM never reads them."""
    scales = {n: t for n, t in ck.tensors.items() if n.endswith(_KV_SCALE_LEAVES)}
    algo = _kv_cache_algo(ck)
    if algo is None:
        if scales:
            ck.warning(
                "kv_cache",
                f"{len(scales)} k/v scale tensors (e.g. {min(scales)}) but no FP8 KV cache in the config: "
                "vLLM ignores them",
            )
        return
    if algo != "FP8":
        ck.warning("kv_cache", f"KV cache {algo!r}: only FP8 KV-cache scales are checked")
        return
    if not scales:
        ck.warning("kv_cache", "FP8 KV cache without k/v scale tensors: vLLM caches with scale 1.0")
        return
    attentions = {n.rsplit(".", 2)[0] for n in scales}
    for attention in sorted(attentions):
        for leaf in _KV_SCALE_LEAVES:
            info = scales.get(attention + leaf)
            if info is None:
                ck.error("kv_cache", f"{attention}{leaf} is missing (the other scale of the layer is there)")
            elif info.dtype != "F32" or math.prod(info.shape) != 1:
                ck.error("kv_cache", f"{info.name}: {info.dtype} {list(info.shape)}, expected a float32 scalar")
            else:
                value = float(ck.read(info).reshape(()))
                if not (math.isfinite(value) and value > 0):
                    ck.error("kv_cache", f"{info.name} = {value}: must be finite and > 0")


def _check_index(ck: NVFP4Checkpoint) -> None:
    if ck.weight_map is None:
        return
    index = "model.safetensors.index.json"
    missing = [n for n, f in ck.weight_map.items() if n not in ck.tensors or ck.tensors[n].file != f]
    unlisted = [n for n in ck.tensors if n not in ck.weight_map]
    if missing:
        ck.error("index", f"{index} lists {len(missing)} tensor(s) not in the named shard, e.g. {missing[0]}")
    if unlisted:
        ck.error("index", f"{index} omits {len(unlisted)} tensor(s) present in the shards, e.g. {unlisted[0]}")
    actual = sum(t.nbytes for t in ck.tensors.values())
    if ck.index_total_size is not None and ck.index_total_size != actual:
        ck.error("index", f"{index} total_size {ck.index_total_size} != {actual} bytes of tensors")
