"""The plan's rules on module names: which kind of module a name is (for scopes and statistics), which
members share one ``weight_scale_2``, and which Linear layers are never quantized by default.

Tensor-naming conventions every stage reads (layer index, experts, embeddings, ``lm_head``, routers, MTP)
are ``formats.names``; what is here is the plan's policy on top of them, which validate reads back.
"""

from __future__ import annotations

import re

from modelopt_streaming.formats.names import experts_of, is_embedding, is_lm_head, is_mtp, is_router

__all__ = ["FUSION_KINDS", "KIND_ORDER", "default_exclusion", "fusion_key", "module_kind"]

# Members of one fused group: vLLM runs them as one matrix with one global scale (spec section 3). Unlike
# consumers.vllm.FUSED_LINEARS (the fused linear layers vLLM names), this also pairs Mixtral's expert w1/w3,
# which vLLM stacks into one MoE ``w13``.
FUSION_KINDS: dict[str, str] = {
    "q_proj": "q/k/v",
    "k_proj": "q/k/v",
    "v_proj": "q/k/v",
    "gate_proj": "gate/up",
    "up_proj": "gate/up",
    "w1": "w1/w3",
    "w3": "w1/w3",
    "q_a_proj": "q_a/kv_a",
    "kv_a_proj_with_mqa": "q_a/kv_a",
}

KIND_ORDER = ("attention", "dense_mlp", "shared_expert", "routed_expert", "other")

_SHARED_EXPERT = re.compile(r"\.shared_experts?\.")
_ATTENTION = re.compile(r"(?:^|\.)(?:self_attn|attention|attn|cross_attn)\.")
_MLP = re.compile(r"(?:^|\.)(?:mlp|feed_forward|ffn|block_sparse_moe)\.")
# Towers and projectors of multimodal models: the plan's default leaves them unquantized. A wider set than
# the substrings vLLM never quantizes on its own (consumers.exclusions); export lists every one it leaves.
_TOWER = re.compile(
    r"(?:^|\.)(?:vision_tower|vision_model|visual|vision|audio_tower|audio_model|audio_encoder|"
    r"multi_modal_projector|mm_projector|vision_projector|audio_projector)(?:\.|$)"
)


def module_kind(module: str) -> str:
    """The kind of a module, for ``--mlp_only`` / ``--experts_only`` and statistics by kind.

    Args:
        module: a module name, or the tensor name of fused 3-D experts.

    Returns:
        "routed_expert", "shared_expert", "attention", "dense_mlp" or "other" (``KIND_ORDER``), the first
        that applies in that order.
    """
    if experts_of(module):
        return "routed_expert"
    if _SHARED_EXPERT.search(module):
        return "shared_expert"
    if _ATTENTION.search(module):
        return "attention"
    if _MLP.search(module):
        return "dense_mlp"
    return "other"


def fusion_key(module: str) -> tuple[str, str] | None:
    """The fused group a module belongs to, as (kind, parent module), e.g. ("q/k/v", "model.layers.0.self_attn");
    None for a module of no fused group (``FUSION_KINDS``)."""
    parent, _, leaf = module.rpartition(".")
    kind = FUSION_KINDS.get(leaf)
    return (kind, parent) if kind else None


def default_exclusion(module: str, num_layers: int | None) -> str | None:
    """Why a Linear module is never quantized by default.

    Args:
        module: a module name.
        num_layers: the language model's ``num_hidden_layers`` (decoder layers at or past it are MTP layers).

    Returns:
        The reason ("vision/audio tower or projector", "MTP layer", "embedding", "lm_head", "MoE router"),
        or None when the module is quantized unless the recipe says otherwise.
    """
    if _TOWER.search(module):
        return "vision/audio tower or projector"
    if is_mtp(module, num_layers):
        return "MTP layer"
    if is_embedding(module):
        return "embedding"
    if is_lm_head(module):
        return "lm_head"
    # DBRX (``ffn.router.layer``) and Granite-MoE (``block_sparse_moe.router.layer``) wrap the router Linear.
    # Only the plan counts that wrapper: formats.names.is_router, and so the consumer rules, do not.
    if is_router(module) or module.split(".")[-2:] == ["router", "layer"]:
        return "MoE router"
    return None
