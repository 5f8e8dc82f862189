"""Consumers: what a serving engine builds from a checkpoint (``vllm``) and how it matches an exclude list
against those layers (``exclusions``)."""

from modelopt_streaming.consumers.exclusions import (
    Disagreement,
    ExclusionMatcher,
    VllmExclusion,
    disagreements,
    vllm_exclude_modules,
)
from modelopt_streaming.consumers.vllm import (
    FAMILIES,
    FUSED_LINEARS,
    GENERIC,
    UNFUSED,
    VLLM_VERSION,
    ConsumerLayer,
    Family,
    RenameMapper,
    consumer_layers,
    family_of,
    load_reference_exclusions,
    text_config,
)

__all__ = [
    "FAMILIES",
    "FUSED_LINEARS",
    "GENERIC",
    "UNFUSED",
    "VLLM_VERSION",
    "ConsumerLayer",
    "Disagreement",
    "ExclusionMatcher",
    "Family",
    "RenameMapper",
    "VllmExclusion",
    "consumer_layers",
    "disagreements",
    "family_of",
    "load_reference_exclusions",
    "text_config",
    "vllm_exclude_modules",
]
