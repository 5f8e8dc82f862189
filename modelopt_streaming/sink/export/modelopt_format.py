"""ModelOpt-format config files (spec section 4), derived from the tensors actually written."""

from __future__ import annotations

import bisect
import copy
import fnmatch
import functools
from collections.abc import Iterable

from modelopt_streaming.consumers import (
    GENERIC,
    UNFUSED,
    ExclusionMatcher,
    Family,
    VllmExclusion,
    consumer_layers,
    disagreements,
    family_of,
)
from modelopt_streaming.errors import ConsumerError
from modelopt_streaming.formats.names import any_layer

PRODUCER_NAME = "modelopt"
# The ModelOpt format revision our files follow; consumers read the name, and the version only for logs.
PRODUCER_VERSION = "0.47.0"


def compact_exclusions(
    unquantized: Iterable[str], linear_modules: Iterable[str], config: dict | None = None
) -> list[str]:
    """The exclude list, exact for vLLM: it matches every layer vLLM builds unquantized and no other.

    Starts from every unquantized module compacted with ``prefix*`` wildcards (ModelOpt's style, exact on
    the checkpoint's names), then adds what vLLM asks about beyond those names (the consumer rules of
    ``config``'s architecture): the fused name of a wholly unquantized fused group (``qkv_proj``,
    ``gate_up_proj``, ``fused_qkv_a_proj``) and ``lm_head`` whether tied or not. For an architecture the
    consumer table does not know, the list is made exact under both the fused and the unfused reading.
    Raises ConsumerError if no list can be exact (a plan that quantized part of a fused layer).
    """
    unquantized = set(unquantized)
    linear_modules = set(linear_modules)
    base = _compact_names(unquantized, linear_modules)
    family = family_of(config)
    readings = [family] if family else [GENERIC, UNFUSED]
    quantized = linear_modules - unquantized
    layers = {fam.name: consumer_layers(linear_modules, config, fam) for fam in readings}
    for fam in readings:
        for lay in layers[fam.name]:
            states = {m in quantized for m in lay.members}
            if len(states) > 1:
                raise ConsumerError(
                    f"{lay.prefix}: vLLM builds {', '.join(lay.members)} as one layer, but only some are "
                    "quantized; no exclude list can describe that"
                )

    def wrong(entries: list[str]) -> list[str]:
        out = []
        for fam in readings:
            found = disagreements(layers[fam.name], quantized.__contains__, VllmExclusion(entries, fam, config))
            out += [d.message() for d in found]
        matcher = ExclusionMatcher(entries)
        out += [f"{m}: not excluded" for m in unquantized if not matcher(m)]
        out += [f"{m}: quantized but excluded" for m in quantized if matcher(m)]
        return out

    entries = list(base)
    added = _missing_consumer_names(entries, readings, layers, quantized, config)
    if added:
        entries = sorted(set(entries) | _fold_layers(added, entries, readings, layers, quantized, config))
    problems = wrong(entries)
    if problems:
        # Wildcards can read differently once vLLM renames or fuses; exact names always read the same.
        entries = sorted(unquantized)
        entries = sorted(set(entries) | _missing_consumer_names(entries, readings, layers, quantized, config))
        problems = wrong(entries)
    if problems:
        raise ConsumerError(f"no exclude list is exact for vLLM: {problems[0]}")
    return entries


def _missing_consumer_names(
    entries: list[str], readings: list[Family], layers: dict, quantized: set[str], config: dict | None
) -> set[str]:
    """Checkpoint-side names of layers vLLM would build NVFP4 although their tensors are not."""
    added: set[str] = set()
    for fam in readings:
        exclusion = VllmExclusion(entries, fam, config)
        for d in disagreements(layers[fam.name], quantized.__contains__, exclusion):
            if not d.tensors_quantized:
                added.add(d.layer.checkpoint_name)
    return added


def _fold_layers(
    added: set[str], entries: list[str], readings: list[Family], layers: dict, quantized: set[str], config
) -> set[str]:
    """One ``layers.*`` entry instead of one per layer, where vLLM still reads the whole list exactly."""
    out: set[str] = set()
    for name in sorted(added):
        general = any_layer(name)
        if general in out:
            continue
        if general == name:
            out.add(name)
            continue
        trial = [*entries, general]
        ok = all(
            not any(
                d.tensors_quantized
                for d in disagreements(layers[f.name], quantized.__contains__, VllmExclusion(trial, f, config))
            )
            for f in readings
        )
        ok = ok and not any(map(ExclusionMatcher([general]), quantized))
        out.add(general if ok else name)
    return out


def _compact_names(unquantized: set[str], linear_modules: set[str]) -> list[str]:
    """Every unquantized module, compacted with ``prefix*`` wildcards where exact on the checkpoint's names."""
    quantized = sorted(set(linear_modules) - unquantized)

    # Every layer's entry folds to the same ``layers.*`` pattern: judge each pattern once.
    @functools.cache
    def safe(pattern: str) -> bool:
        if pattern.endswith("*") and "*" not in pattern[:-1]:
            prefix = pattern[:-1]
            i = bisect.bisect_left(quantized, prefix)
            return not (i < len(quantized) and quantized[i].startswith(prefix))
        return not any(map(ExclusionMatcher([pattern]), quantized))

    by_prefix = sorted(unquantized)

    def count_under(prefix: str) -> int:
        return bisect.bisect_left(by_prefix, prefix + "/") - bisect.bisect_left(by_prefix, prefix + ".")

    entries: set[str] = set()
    covered: set[str] = set()
    for module in sorted(unquantized):
        if module in covered:
            continue
        parts = module.split(".")
        chosen = module
        # Shortest ancestor whose whole subtree is unquantized and holds at least two modules.
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            # After a numeric component (a layer or expert index) the dot stays in the pattern, so
            # "layers.3" cannot also swallow layers 30-39; elsewhere "self_attn*" also matches the
            # parent itself, which is the prefix vLLM asks about for fused and MoE layers.
            pattern = prefix + (".*" if parts[depth - 1].isdigit() else "*")
            if count_under(prefix) >= 2 and safe(pattern):
                chosen = pattern
                break
        entries.add(chosen)
        covered.update(m for m in unquantized if m == chosen or fnmatch.fnmatchcase(m, chosen))

    # Fold per-layer entries into one across layers where that is still exact.
    folded: set[str] = set()
    for entry in sorted(entries):
        general = any_layer(entry)
        if general != entry and safe(general):
            folded.add(general)
        else:
            folded.add(entry)
    result = sorted(folded)
    matcher = ExclusionMatcher(result)
    missing = [m for m in unquantized if not matcher(m)]
    wrong = [m for m in quantized if matcher(m)]
    if missing or wrong:  # pragma: no cover - guarded by the construction above
        raise AssertionError(f"exclude list not exact: missing {missing[:3]}, wrongly matching {wrong[:3]}")
    return result


def hf_quant_config(exclude_modules: list[str], weight_only: bool, kv_cache: str | None = None) -> dict:
    """``hf_quant_config.json``. ``kv_cache`` "fp8" or "fp8_cast": ``kv_cache_quant_algo: "FP8"`` as ModelOpt
    0.47 writes it for both of its FP8 KV modes (``export/quant_utils.py`` ``get_quant_config``)."""
    return {
        "producer": {"name": PRODUCER_NAME, "version": PRODUCER_VERSION},
        "quantization": {
            "quant_algo": "W4A16_NVFP4" if weight_only else "NVFP4",
            "kv_cache_quant_algo": "FP8" if kv_cache else None,
            "group_size": 16,
            "exclude_modules": exclude_modules,
        },
    }


def model_config(
    source_config: dict, exclude_modules: list[str], weight_only: bool, kv_cache: str | None = None
) -> dict:
    """The source config.json with its ``quantization_config`` replaced (a stale one must not survive). With an
    FP8 KV cache, ModelOpt's ``kv_cache_scheme`` after ``quant_algo`` (``export/convert_hf_config.py``), which
    vLLM reads from config.json first (``transformers_utils/config.py``; ``ModelOptFp8Config.from_config``)."""
    config = copy.deepcopy(source_config)
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    group: dict = {"weights": dict(fp4), "targets": ["Linear"]}
    if not weight_only:
        group = {"input_activations": dict(fp4), **group}
    config["quantization_config"] = {
        "config_groups": {"group_0": group},
        "ignore": exclude_modules,
        "quant_algo": "W4A16_NVFP4" if weight_only else "NVFP4",
        **({"kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}} if kv_cache else {}),
        "producer": {"name": PRODUCER_NAME, "version": PRODUCER_VERSION},
        "quant_method": "modelopt",
    }
    # Multimodal configs nest the language model's config; a stale quantization_config there would
    # contradict the top-level one.
    for key in ("text_config", "language_config"):
        if isinstance(config.get(key), dict):
            config[key].pop("quantization_config", None)
    return config


def safetensors_index(weight_map: dict[str, str], total_size: int, metadata: dict | None = None) -> dict:
    return {"metadata": {"total_size": total_size, **(metadata or {})}, "weight_map": dict(sorted(weight_map.items()))}
