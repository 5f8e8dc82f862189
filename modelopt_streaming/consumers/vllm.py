"""What vLLM builds from a checkpoint: the layers its model classes make, under the names they ask their
quantization config about.

Export writes exclusions in these terms and validate judges by them, so both reason about the names vLLM
actually asks about, never about the checkpoint's tensor names alone. The rules follow vLLM 0.32.0, one
``Family`` per model class (or set of classes with the same rules); each cites the file and function it comes
from (paths below ``vllm/model_executor/``). Fused linear layers replace their checkpoint members
(``qkv_proj`` for q/k/v, ``gate_up_proj`` for gate/up, ``fused_qkv_a_proj`` for MLA's q_a/kv_a), one
``FusedMoE`` layer (prefix ``...experts``) replaces all routed experts of a MoE block, ``lm_head`` is built
and asked about even when it is tied to the embedding and has no tensor, and some classes rename modules
(GPT-OSS ``self_attn`` -> ``attn``). How vLLM then matches an exclude list against these layers is
``consumers.exclusions``. ``tests/test_consumer_vllm.py`` checks this table against vLLM's own code: it
builds each model class from our config.json and records every prefix vLLM asks about.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modelopt_streaming.errors import CheckpointError
from modelopt_streaming.formats.names import experts_of, is_embedding, is_lm_head, is_mtp, is_router
from modelopt_streaming.source.index import load_json

VLLM_VERSION = "0.32.0"

# Checkpoint members that vLLM builds as one fused linear layer, by parent module. The fused names are the
# keys of the model classes' packed_modules_mapping (models/llama.py LlamaForCausalLM, models/deepseek_v2.py
# DeepseekV2ForCausalLM.__init__ for fused_qkv_a_proj); a group is fused only when all its members exist
# (DeepSeek-V2-Lite has a lone q_proj and builds it as q_proj).
FUSED_LINEARS: dict[tuple[str, ...], str] = {
    ("q_proj", "k_proj", "v_proj"): "qkv_proj",
    ("gate_proj", "up_proj"): "gate_up_proj",
    ("q_a_proj", "kv_a_proj_with_mqa"): "fused_qkv_a_proj",
}
# leaf -> (its group's members, the fused name)
FUSED_LINEARS_OF_LEAF = {leaf: (members, fused) for members, fused in FUSED_LINEARS.items() for leaf in members}


@dataclass(frozen=True)
class RenameMapper:
    """The renames of a model class's ``hf_to_vllm_mapper`` as ``WeightsMapper.get_rename_mapper`` keeps
    them (models/utils.py: stacked maps and maps to None dropped), applied in ``WeightsMapper``'s order:
    substrings (first occurrence), then prefixes, then suffixes (last occurrence)."""

    substr: Mapping[str, str] = field(default_factory=dict)
    prefix: Mapping[str, str] = field(default_factory=dict)
    suffix: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, name: str) -> str:
        for old, new in self.substr.items():
            if old in name:
                name = name.replace(old, new, 1)
        for old, new in self.prefix.items():
            if name.startswith(old):
                name = name.replace(old, new, 1)
        for old, new in self.suffix.items():
            if name.endswith(old):
                name = new.join(name.rsplit(old, 1))
        return name


@dataclass(frozen=True)
class Family:
    """One vLLM model class (or a set with the same rules) and what it builds."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    # packed_modules_mapping of the class as vLLM hands it to the quant config, for a given (text) config.
    packed: Callable[[dict], dict[str, list[str]]]
    # hf_to_vllm_mapper's renames; None: the class has no mapper, so apply_vllm_mapper never runs.
    mapper: RenameMapper | None
    # Routers built with the quant config (so asked about); other classes build them with quant_config=None.
    routers_asked: bool = False
    lm_head_asked: bool = True
    # Towers the class builds with quant_config=None: never asked about, always unquantized.
    unasked_prefixes: tuple[str, ...] = ()
    source: str = ""


def _fixed(mapping: dict[str, list[str]]) -> Callable[[dict], dict[str, list[str]]]:
    return lambda _config: {k: list(v) for k, v in mapping.items()}


_QKV = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
_GATE_UP = {"gate_up_proj": ["gate_proj", "up_proj"]}
_NO_RENAMES = RenameMapper()


def _deepseek_packed(config: dict) -> dict[str, list[str]]:
    # models/deepseek_v2.py DeepseekV2ForCausalLM.__init__: qkv_proj only for MHA variants, fused_qkv_a_proj
    # when q_lora_rank is set.
    packed = dict(_GATE_UP)
    if config.get("model_type") == "deepseek" or all(
        not config.get(k) for k in ("qk_nope_head_dim", "qk_rope_head_dim")
    ):
        packed.update(_QKV)
    if config.get("q_lora_rank") is not None:
        packed["fused_qkv_a_proj"] = ["q_a_proj", "kv_a_proj_with_mqa"]
    return packed


def _qwen3_moe_packed(_config: dict) -> dict[str, list[str]]:
    # models/qwen3_moe.py: Qwen3MoeForCausalLM.__init__ adds gate_up_proj when mlp_only_layers is set, but
    # the class is SupportsQuant, whose __new__ (models/interfaces.py) has already copied the mapping into
    # the quant config: in a fresh vLLM process the quant config only knows qkv_proj. A dense layer's
    # gate_up_proj is then matched by its own name only, which the export lists.
    return dict(_QKV)


def _qwen2_moe_packed(config: dict) -> dict[str, list[str]]:
    # models/qwen2_moe.py Qwen2MoeForCausalLM.__init__.
    dense = config.get("mlp_only_layers") or (config.get("shared_expert_intermediate_size") or 0) > 0
    return {**_QKV, **(_GATE_UP if dense else {})}


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
        ("llama", "mistral", "qwen2", "qwen3"),
        _fixed({**_QKV, **_GATE_UP}),
        # LlamaModel.hf_to_vllm_mapper has stacked maps only: nothing is renamed, but apply_vllm_mapper runs.
        _NO_RENAMES,
        source="models/llama.py LlamaForCausalLM (packed_modules_mapping, hf_to_vllm_mapper); qwen2.py, qwen3.py",
    ),
    Family(
        "qwen3_moe",
        ("Qwen3MoeForCausalLM",),
        ("qwen3_moe",),
        _qwen3_moe_packed,
        _NO_RENAMES,
        routers_asked=True,  # Qwen3MoeSparseMoeBlock builds mlp.gate as a GateLinear with the quant config
        source="models/qwen3_moe.py Qwen3MoeForCausalLM, Qwen3MoeSparseMoeBlock",
    ),
    Family(
        "qwen2_moe",
        ("Qwen2MoeForCausalLM",),
        ("qwen2_moe",),
        _qwen2_moe_packed,
        _NO_RENAMES,
        source="models/qwen2_moe.py Qwen2MoeForCausalLM, Qwen2MoeSparseMoeBlock",
    ),
    Family(
        "mixtral",
        ("MixtralForCausalLM",),
        ("mixtral",),
        _fixed(_QKV),
        # MixtralModel.hf_to_vllm_mapper.orig_to_new_substr (gate/up/down names of W8A8 experts).
        RenameMapper(substr={".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}),
        source="models/mixtral.py MixtralForCausalLM, MixtralModel.hf_to_vllm_mapper",
    ),
    Family(
        "deepseek_v2",
        ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekForCausalLM"),
        ("deepseek_v2", "deepseek_v3", "deepseek", "kimi_k2"),
        _deepseek_packed,
        None,  # DeepseekV2ForCausalLM has no hf_to_vllm_mapper
        source="models/deepseek_v2.py DeepseekV2ForCausalLM.__init__",
    ),
    Family(
        "kimi_k25",
        ("KimiK25ForConditionalGeneration",),
        ("kimi_k25",),
        _deepseek_packed,
        # KimiK25ForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix
        RenameMapper(
            prefix={
                "language_model.layers.": "language_model.model.layers.",
                "mm_projector.proj.0": "mm_projector.linear_1",
                "mm_projector.proj.2": "mm_projector.linear_2",
            }
        ),
        source="models/kimi_k25.py KimiK25ForConditionalGeneration (language_model: DeepseekV2ForCausalLM)",
    ),
    Family(
        "gpt_oss",
        ("GptOssForCausalLM",),
        ("gpt_oss",),
        _fixed(_QKV),
        # GptOssForCausalLM.hf_to_vllm_mapper: orig_to_new_substr and the orig_to_new_suffix entries that can
        # end a module name in an exclude list.
        RenameMapper(
            substr={".self_attn.": ".attn."},
            suffix={
                ".embed_tokens.weight": ".embedding.weight",
                ".gate_up_proj_blocks": ".w13_weight",
                ".down_proj_blocks": ".w2_weight",
                ".gate_up_proj_scales": ".w13_weight_scale",
                ".down_proj_scales": ".w2_weight_scale",
                ".gate_up_proj": ".w13_weight",
                ".down_proj": ".w2_weight",
                ".gate_up_proj_bias": ".w13_bias",
                ".down_proj_bias": ".w2_bias",
                ".gate_up_proj.weight": ".w13_weight",
                ".gate_up_proj.weight_scale": ".w13_weight_scale",
                ".gate_up_proj.bias": ".w13_bias",
                ".gate_up_proj.input_scale": ".w13_input_scale",
                ".down_proj.weight": ".w2_weight",
                ".down_proj.weight_scale": ".w2_weight_scale",
                ".down_proj.bias": ".w2_bias",
                ".down_proj.input_scale": ".w2_input_scale",
            },
        ),
        lm_head_asked=False,  # GptOssForCausalLM builds its ParallelLMHead without the quant config
        source="models/gpt_oss.py GptOssForCausalLM (packed_modules_mapping, hf_to_vllm_mapper, lm_head)",
    ),
)

FAMILIES += (
    Family(
        "llama4",
        ("Llama4ForConditionalGeneration", "Llama4ForCausalLM"),
        ("llama4", "llama4_text"),
        _fixed({**_QKV, **_GATE_UP}),
        # The language model is a Llama4ForCausalLM (a SupportsQuant LlamaForCausalLM): its
        # hf_to_vllm_mapper (stacked maps only) makes apply_vllm_mapper run.
        _NO_RENAMES,
        # Llama4MoE builds its router as GateLinear without the quant config; experts are 3-D (FusedMoE).
        unasked_prefixes=("vision_model.", "multi_modal_projector."),
        source="models/mllama4.py Llama4ForConditionalGeneration.__init__ (vision_model and "
        "multi_modal_projector with quant_config=None), models/llama4.py Llama4ForCausalLM, Llama4MoE",
    ),
)

# A class not in the table: vLLM's usual naming (the fused names above, FusedMoE ``...experts``, an asked
# lm_head). Export then makes the list exact under both the fused and the unfused reading, so it holds
# whether or not the class fuses; validate says it could not confirm the class.
GENERIC = Family(
    "generic",
    (),
    (),
    _fixed({fused: list(members) for members, fused in FUSED_LINEARS.items()}),
    None,
    routers_asked=True,
    source="the naming shared by vLLM's model classes (no class-specific rule known)",
)
UNFUSED = Family("unfused", (), (), _fixed({}), None, routers_asked=True, source="a class that fuses nothing")


def text_config(config: dict) -> dict:
    """The language model's part of a config.json: a nested ``text_config`` or ``language_config`` that has
    ``num_hidden_layers`` (multimodal classes), else the config itself."""
    for key in ("text_config", "language_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and sub.get("num_hidden_layers") is not None:
            return sub
    return config


def family_of(config: dict | None) -> Family | None:
    """The consumer rules of the vLLM model class a config.json names.

    Args:
        config: a config.json; None or empty reads as an unknown class.

    Returns:
        The family listing one of ``architectures``; when the config names no architecture, the family of its
        ``model_type``; None when the class is not in the table (callers then read under ``GENERIC`` or
        both ``GENERIC`` and ``UNFUSED``).
    """
    config = config or {}
    archs = config.get("architectures") or []
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    if archs:
        return None
    model_type = config.get("model_type")
    return next((f for f in FAMILIES if model_type in f.model_types), None)


@dataclass(frozen=True)
class ConsumerLayer:
    """A layer vLLM builds, under the name it asks its quant config about."""

    prefix: str  # vLLM's module name, e.g. "model.layers.0.self_attn.qkv_proj"
    checkpoint_name: str  # the same layer in checkpoint terms (what an exclude entry names before renaming)
    members: tuple[str, ...]  # checkpoint modules whose tensors make the layer (empty: tied lm_head)
    kind: str  # "linear", "fused", "experts", "lm_head", "router"
    asked: bool = True  # False: built with quant_config=None, always unquantized


def consumer_layers(modules: Iterable[str], config: dict | None, family: Family | None = None) -> list[ConsumerLayer]:
    """The layers vLLM builds from a checkpoint, under the names it asks its quantization config about.

    Modules vLLM does not build as layers that can be quantized (embeddings, MTP layers past
    ``num_hidden_layers``) are left out; ``lm_head`` is added when the checkpoint has none (tied embeddings).

    Args:
        modules: the checkpoint's weight-bearing module names (``X`` for ``X.weight``, and the tensor name of
            fused 3-D experts), quantized or not.
        config: the checkpoint's config.json (None: an unknown class with no nested language model).
        family: the consumer rules to apply; by default ``family_of(config)``, else ``GENERIC``.

    Returns:
        Every layer, sorted by its vLLM prefix.
    """
    config = config or {}
    family = family or family_of(config) or GENERIC
    text = text_config(config)
    num_layers = text.get("num_hidden_layers")
    rename = family.mapper or _NO_RENAMES
    modules = sorted(set(modules))
    by_parent: dict[str, set[str]] = defaultdict(set)
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        by_parent[parent].add(leaf)

    layers: dict[str, ConsumerLayer] = {}
    experts: dict[str, list[str]] = defaultdict(list)
    fused: dict[tuple[str, str], list[str]] = defaultdict(list)
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        # vLLM's main model builds num_hidden_layers layers; MTP layers are another model.
        if is_embedding(m) or is_mtp(m, num_layers):
            continue
        moe = experts_of(m, projection_only=True)
        if moe:
            experts[moe].append(m)
            continue
        if is_lm_head(m):
            layers[m] = ConsumerLayer(rename(m), m, (m,), "lm_head", family.lm_head_asked)
            continue
        if is_router(m):
            layers[m] = ConsumerLayer(rename(m), m, (m,), "router", family.routers_asked)
            continue
        group = FUSED_LINEARS_OF_LEAF.get(leaf)
        if group and all(x in by_parent[parent] for x in group[0]):
            fused[(parent, group[1])].append(m)
            continue
        layers[m] = ConsumerLayer(rename(m), m, (m,), "linear", not m.startswith(family.unasked_prefixes))
    for (parent, name), members in fused.items():
        ck = f"{parent}.{name}"
        layers[ck] = ConsumerLayer(rename(ck), ck, tuple(members), "fused", not ck.startswith(family.unasked_prefixes))
    for ck, members in experts.items():
        layers[ck] = ConsumerLayer(rename(ck), ck, tuple(sorted(members)), "experts")
    # lm_head is built (and asked about) even when tied to the embedding and absent from the checkpoint
    # (models/llama.py LlamaForCausalLM.__init__: ParallelLMHead(..., quant_config) before tie_weights).
    if not any(lay.kind == "lm_head" for lay in layers.values()) and modules:
        # A multimodal class builds its language model under "language_model." (models/kimi_k25.py).
        ck = "language_model.lm_head" if any(m.startswith("language_model.") for m in modules) else "lm_head"
        layers[ck] = ConsumerLayer(rename(ck), ck, (), "lm_head", family.lm_head_asked)
    return sorted(layers.values(), key=lambda lay: lay.prefix)


def load_reference_exclusions(path: str | os.PathLike) -> tuple[str, ...]:
    """The exclude list of a reference checkpoint's config, for ``--exclude_config`` (the plan reads it with
    ``consumers.exclusions.ExclusionMatcher``, as vLLM reads a list it does not fuse or rename).

    Args:
        path: an hf_quant_config.json, or a config.json with a ``quantization_config``, or a JSON file with a
            top-level ``exclude_modules`` or ``ignore`` list.

    Returns:
        ``quantization.exclude_modules``, else ``quantization_config.ignore``, else the top-level list.

    Raises:
        CheckpointError: the file cannot be read as JSON, or holds none of those lists.
    """
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
