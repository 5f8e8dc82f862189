"""How checkpoint tensors are named: the decoder layer index, routed and fused 3-D experts, embeddings,
``lm_head``, MoE routers and MTP layers.

Hugging Face checkpoints follow conventions, not a schema. These rules read the conventions once for every
stage that needs them: the consumer rules (what vLLM builds), the plan (what to quantize), export and
validation. A module name is ``X`` for a tensor ``X.weight``; fused 3-D experts are named by their tensor.
"""

from __future__ import annotations

import re

__all__ = [
    "EMBEDDING_LEAVES",
    "FUSED_EXPERTS",
    "any_layer",
    "experts_of",
    "is_embedding",
    "is_lm_head",
    "is_mtp",
    "is_router",
]

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Only an index inside the name: ``any_layer`` writes the dot before ``layers`` back.
_INNER_LAYER_INDEX = re.compile(r"\.layers\.\d+\.")

# A routed expert: anything under ``<moe>.experts.<E>.``, however deep. Group 1 is the MoE layer's experts
# module. This is the plan's reading: every weight of an expert belongs to its MoE layer.
_ROUTED_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.")
# One projection directly under the expert index, ``<moe>.experts.<E>.<proj>``: what vLLM's FusedMoE layer
# loads as its members (layers/fused_moe/routed_experts.py RoutedExperts.build_expert_params_mapping maps
# ``experts.{E}.{proj}.``). A deeper module under an expert is no part of it, so the consumer rules read
# such a module as a layer of its own.
_ROUTED_EXPERT_PROJECTION = re.compile(r"^(.*\.experts)\.\d+\.[^.]+$")
# GPT-OSS and Llama-4 keep each MoE layer's experts as two 3-D tensors with the input dimension in the
# middle: ``gate_up_proj`` [E, hidden, 2 * inter] and ``down_proj`` [E, inter, hidden] (no ``.weight``).
FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(?:gate_up_proj|down_proj)$")

# Embeddings are VocabParallelEmbedding in vLLM: get_quant_method returns None for them whatever the list
# says (ModelOptQuantConfigBase.get_quant_method, layers/quantization/modelopt.py, handles only LinearBase,
# ParallelLMHead and RoutedExperts). The plan never quantizes them either. GPT-NeoX names its embedding
# ``embed_in``; OPT/BART/Whisper-style models learn ``embed_positions``.
EMBEDDING_LEAVES = frozenset(
    {
        "embed_tokens",
        "wte",
        "wpe",
        "word_embeddings",
        "embeddings",
        "tok_embeddings",
        "embed_in",
        "embed_positions",
        "embedding",
    }
)
# The output projection: GPT-NeoX calls its lm_head ``embed_out`` (GPTNeoXForCausalLM.embed_out), Llama's
# original release ``output``.
_LM_HEAD_LEAVES = frozenset({"lm_head", "embed_out"})
_ROUTER_PARENTS = frozenset({"mlp", "block_sparse_moe", "feed_forward", "moe"})
_ROUTER_LEAVES = frozenset({"router", "shared_expert_gate"})
# MTP modules kept outside ``layers``: MiMo's ``model.mtp_layers.N``, DeepSeek-style ``mtp.*``.
_MTP_PARTS = frozenset({"mtp_layers"})


def experts_of(module: str, *, projection_only: bool = False) -> str | None:
    """The experts module (``...mlp.experts``) of the MoE layer that ``module`` belongs to.

    Args:
        module: a module name, or the tensor name of fused 3-D experts.
        projection_only: count a routed expert's module only when it is one projection directly under the
            expert index (``experts.3.gate_proj``), as vLLM's FusedMoE loads them; by default anything under
            ``experts.<E>.`` counts.

    Returns:
        The name up to and including ``experts``, or None if ``module`` is no routed expert and no fused
        3-D experts tensor.
    """
    routed = _ROUTED_EXPERT_PROJECTION if projection_only else _ROUTED_EXPERT
    m = routed.match(module) or FUSED_EXPERTS.match(module)
    return m.group(1) if m else None


def is_embedding(module: str) -> bool:
    """Whether ``module`` is a token or position embedding (by its last component, ``EMBEDDING_LEAVES``)."""
    return module.rpartition(".")[2] in EMBEDDING_LEAVES


def is_lm_head(module: str) -> bool:
    """Whether ``module`` is the output projection (``lm_head``, GPT-NeoX's ``embed_out``, a bare ``output``)."""
    return module.rpartition(".")[2] in _LM_HEAD_LEAVES or module == "output"


def is_router(module: str) -> bool:
    """Whether ``module`` is an MoE router by its own name: ``router``, ``shared_expert_gate``, or a ``gate``
    directly under ``mlp``, ``block_sparse_moe``, ``feed_forward`` or ``moe``. A router Linear wrapped one
    level deeper (DBRX's ``ffn.router.layer``) is not one here; the plan adds it (plan.names)."""
    parent, _, leaf = module.rpartition(".")
    return leaf in _ROUTER_LEAVES or (leaf == "gate" and parent.rpartition(".")[2] in _ROUTER_PARENTS)


def is_mtp(module: str, num_layers: int | None) -> bool:
    """Whether ``module`` belongs to a multi-token-prediction layer, which the main model does not build.

    Args:
        module: a module name.
        num_layers: the language model's ``num_hidden_layers``; a decoder layer at or past it is an MTP layer
            (DeepSeek-V3's layer 61). None (or not an int): only MTP modules outside ``layers`` count.

    Returns:
        True for ``mtp.*``, anything under ``mtp_layers``, and ``layers.N`` with N >= ``num_layers``.
    """
    parts = module.split(".")
    if parts[0] == "mtp" or not _MTP_PARTS.isdisjoint(parts):
        return True
    layer = _LAYER_INDEX.search(module)
    return bool(layer and isinstance(num_layers, int) and int(layer.group(1)) >= num_layers)


def any_layer(name: str) -> str:
    """``name`` with every ``.layers.N.`` inside it written ``.layers.*.``: one fnmatch pattern for the same
    module in every decoder layer (a name that starts with ``layers.N.`` keeps its index)."""
    return _INNER_LAYER_INDEX.sub(".layers.*.", name)
