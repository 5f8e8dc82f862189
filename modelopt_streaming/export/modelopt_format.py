"""ModelOpt-format config files (spec section 4), derived from the tensors actually written."""

from __future__ import annotations

import bisect
import copy
import fnmatch
import re
from collections.abc import Iterable

from ..plan import ExclusionMatcher

PRODUCER_NAME = "modelopt"
# The ModelOpt format revision our files follow; consumers read the name, and the version only for logs.
PRODUCER_VERSION = "0.47.0"
_LAYER = re.compile(r"\.layers\.\d+\.")


def compact_exclusions(unquantized: Iterable[str], linear_modules: Iterable[str]) -> list[str]:
    """The exclude list: every unquantized Linear, compacted with ``prefix*`` wildcards where exact.

    A wildcard is used only if, read the way vLLM reads the list (exact, substring, fnmatch), it
    matches no quantized module; the result is checked entry by entry before it is returned.
    """
    unquantized = set(unquantized)
    quantized = sorted(set(linear_modules) - unquantized)

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
        general = _LAYER.sub(".layers.*.", entry)
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


def hf_quant_config(exclude_modules: list[str], weight_only: bool) -> dict:
    return {
        "producer": {"name": PRODUCER_NAME, "version": PRODUCER_VERSION},
        "quantization": {
            "quant_algo": "W4A16_NVFP4" if weight_only else "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": exclude_modules,
        },
    }


def model_config(source_config: dict, exclude_modules: list[str], weight_only: bool) -> dict:
    """The source config.json with its ``quantization_config`` replaced (a stale one must not survive)."""
    config = copy.deepcopy(source_config)
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    group: dict = {"weights": dict(fp4), "targets": ["Linear"]}
    if not weight_only:
        group = {"input_activations": dict(fp4), **group}
    config["quantization_config"] = {
        "config_groups": {"group_0": group},
        "ignore": exclude_modules,
        "quant_algo": "W4A16_NVFP4" if weight_only else "NVFP4",
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
