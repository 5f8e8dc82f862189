"""Consumer rules: what vLLM builds from a checkpoint and how it reads a ModelOpt exclude list.

Export writes exclusions in these terms and validate judges by them, so both reason about the names vLLM
actually asks its quantization config about, never about the checkpoint's tensor names alone. The rules
follow vLLM 0.32.0; each one cites the file and function it comes from (paths below
``vllm/model_executor/``). ``tests/test_consumer_vllm.py`` checks this table against vLLM's own code: it
builds each model class from our config.json and records every prefix vLLM asks about.

Two readings matter:

* **The layers vLLM builds.** Fused linear layers replace their checkpoint members (``qkv_proj`` for
  q/k/v, ``gate_up_proj`` for gate/up, ``fused_qkv_a_proj`` for MLA's q_a/kv_a), one ``FusedMoE`` layer
  (prefix ``...experts``) replaces all routed experts of a MoE block, ``lm_head`` is built and asked about
  even when it is tied to the embedding and has no tensor, and some classes rename modules
  (GPT-OSS ``self_attn`` -> ``attn``).
* **How vLLM matches a name against the list** (``ModelOptQuantConfigBase.is_layer_excluded`` in
  ``layers/quantization/modelopt.py``): exact match with fused-shard expansion (``is_layer_skipped`` in
  ``layers/quantization/utils/quant_utils.py``), then substring, then ``fnmatch``; before that,
  ``apply_vllm_mapper`` rewrites each ``prefix*`` entry into ``prefix`` and ``prefix.*`` and renames entries
  with the class's ``hf_to_vllm_mapper`` (only for classes that have one).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modelopt_streaming.errors import CheckpointError, PartlyExcludedFusedLayer
from modelopt_streaming.source.index import load_json

VLLM_VERSION = "0.32.0"

# ModelOptQuantConfigBase.get_quant_method (layers/quantization/modelopt.py): a prefix containing one of
# these is built unquantized even when the exclude list does not name it.
_ALWAYS_UNQUANTIZED_SUBSTRINGS = ("vision_tower", "vision_model", "vit_large_projector")

# Checkpoint members that vLLM builds as one fused linear layer, by parent module. The fused names are the
# keys of the model classes' packed_modules_mapping (models/llama.py LlamaForCausalLM, models/deepseek_v2.py
# DeepseekV2ForCausalLM.__init__ for fused_qkv_a_proj); a group is fused only when all its members exist
# (DeepSeek-V2-Lite has a lone q_proj and builds it as q_proj).
FUSED_LINEARS: dict[tuple[str, ...], str] = {
    ("q_proj", "k_proj", "v_proj"): "qkv_proj",
    ("gate_proj", "up_proj"): "gate_up_proj",
    ("q_a_proj", "kv_a_proj_with_mqa"): "fused_qkv_a_proj",
}
_FUSED_OF_LEAF = {leaf: (members, fused) for members, fused in FUSED_LINEARS.items() for leaf in members}

_ROUTED_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.[^.]+$")
# GPT-OSS / Llama-4: each MoE block's experts as two 3-D tensors named without ``.weight``.
_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(?:gate_up_proj|down_proj)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Embeddings are VocabParallelEmbedding in vLLM: get_quant_method returns None for them whatever the list
# says (ModelOptQuantConfigBase.get_quant_method handles only LinearBase, ParallelLMHead and RoutedExperts).
# The plan never quantizes them either. GPT-NeoX names its embedding ``embed_in``; OPT/BART/Whisper-style
# models learn ``embed_positions``.
EMBEDDING_LEAVES = {
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
    for key in ("text_config", "language_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and sub.get("num_hidden_layers") is not None:
            return sub
    return config


def family_of(config: dict | None) -> Family | None:
    """The family of a config.json (``architectures`` first, then ``model_type``), or None if unknown."""
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
    """The layers vLLM builds from a checkpoint whose weight-bearing modules are ``modules``.

    ``modules`` are checkpoint module names (``X`` for ``X.weight``, and the tensor name of 3-D fused
    experts). Modules vLLM does not build (embeddings, MTP layers past ``num_hidden_layers``) are left out.
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
        parts = m.split(".")
        if leaf in EMBEDDING_LEAVES:
            continue
        layer = _LAYER_INDEX.search(m)
        if "mtp_layers" in parts or parts[0] == "mtp":
            continue
        if layer and isinstance(num_layers, int) and int(layer.group(1)) >= num_layers:
            continue  # vLLM's main model builds num_hidden_layers layers; MTP layers are another model
        expert = _ROUTED_EXPERT.match(m) or _FUSED_EXPERTS.match(m)
        if expert:
            experts[expert.group(1)].append(m)
            continue
        if leaf in ("lm_head", "embed_out") or m == "output":
            layers[m] = ConsumerLayer(rename(m), m, (m,), "lm_head", family.lm_head_asked)
            continue
        router = leaf in ("router", "shared_expert_gate") or (
            leaf == "gate" and parts[-2:-1] in (["mlp"], ["block_sparse_moe"], ["feed_forward"], ["moe"])
        )
        if router:
            layers[m] = ConsumerLayer(rename(m), m, (m,), "router", family.routers_asked)
            continue
        group = _FUSED_OF_LEAF.get(leaf)
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


def vllm_exclude_modules(exclude_modules: Iterable[str], family: Family | None) -> list[str]:
    """The list as vLLM holds it after ``ModelOptQuantConfigBase.apply_vllm_mapper`` (modelopt.py): run only
    for classes with an ``hf_to_vllm_mapper``; ``prefix*`` becomes ``prefix`` and ``prefix.*``, then every
    entry is renamed."""
    entries = list(exclude_modules)
    if family is None or family.mapper is None or not entries:
        return entries
    split: list[str] = []
    for e in entries:
        if len(e) >= 2 and e[-1] == "*" and e[-2] != ".":
            split += [e[:-1], e[:-1] + ".*"]
        else:
            split.append(e)
    return [family.mapper(e) for e in split]


class VllmExclusion:
    """``ModelOptQuantConfigBase.is_layer_excluded`` (layers/quantization/modelopt.py) for one list and class.

    Compiled once (substring and wildcard passes as one regular expression each), since a 1T-parameter
    checkpoint's list can name tens of thousands of modules.
    """

    def __init__(self, exclude_modules: Iterable[str], family: Family | None, config: dict | None = None):
        self.family = family
        self.raw = tuple(exclude_modules)
        self.entries = tuple(vllm_exclude_modules(self.raw, family))
        self.packed = family.packed(text_config(config or {})) if family else {}
        self._exact = set(self.entries)
        self._expert_entries = tuple(e for e in self.entries if "experts" in e)
        plain = [re.escape(e) for e in self.entries]  # an empty entry is a substring of every name, as there
        self._substring = re.compile("|".join(plain)) if plain else None
        wild = [fnmatch.translate(e) for e in self.entries]
        self._wildcard = re.compile("|".join(f"(?:{w})" for w in wild)) if wild else None

    def _skipped(self, prefix: str) -> bool:
        """``is_layer_skipped`` in exact mode (layers/quantization/utils/quant_utils.py)."""
        proj = prefix.split(".")[-1]
        if proj in self.packed and prefix in self._exact:
            return True
        if proj in self.packed:
            # Every occurrence of the fused name is replaced, as str.replace does there.
            shards = [prefix.replace(proj, shard) for shard in self.packed[proj]]
            states = {s: s in self._exact for s in shards}
            if len(set(states.values())) > 1:
                listed = [s for s, v in states.items() if v]
                raise PartlyExcludedFusedLayer(
                    f"{prefix}: the exclude list names {', '.join(listed)} but not every shard of the fused "
                    "layer; vLLM refuses to load ('Detected some but not all shards ... are quantized')"
                )
            return next(iter(states.values()))
        if "experts" in prefix:
            return any(prefix in e for e in self._expert_entries)
        return prefix in self._exact

    def excluded(self, prefix: str) -> bool:
        if not self.entries:
            return False
        if self._skipped(prefix):
            return True
        # Substring pass, skipping an entry equal to the prefix (the exact pass judged it). Stripping a
        # leading "language_model." there cannot add a match: a substring of the rest is one of the whole.
        if (
            self._substring
            and self._substring.search(prefix)
            and (prefix not in self._exact or any(e != prefix and e in prefix for e in self.entries))
        ):
            return True
        return bool(self._wildcard and self._wildcard.match(prefix))

    def quantizes(self, layer: ConsumerLayer) -> bool:
        """Whether vLLM builds this layer NVFP4 (``ModelOptQuantConfigBase.get_quant_method``)."""
        if not layer.asked:
            return False
        if self.excluded(layer.prefix):
            return False
        return not any(s in layer.prefix for s in _ALWAYS_UNQUANTIZED_SUBSTRINGS)


@dataclass(frozen=True)
class Disagreement:
    layer: ConsumerLayer
    tensors_quantized: bool | None  # None: members disagree among themselves
    vllm: str  # "NVFP4", "unquantized" or "refuses to load: ..."
    entries: tuple[str, ...] = ()  # the list's entries that exclude the layer, when vLLM excludes it

    def message(self, tensors: str = "") -> str:
        lay = self.layer
        members = ", ".join(lay.members[:3]) + (f", ... ({len(lay.members)} modules)" if len(lay.members) > 3 else "")
        what = f"{lay.prefix}" + (f" (checkpoint {members})" if lay.members != (lay.prefix,) else "")
        if lay.kind == "lm_head" and not lay.members:
            what = f"{lay.prefix} (no tensor of its own: vLLM ties it to the bf16 embedding)"
            tensors = "never loaded"
        if self.vllm.startswith("refuses"):
            return f"{what}: vLLM {self.vllm}; list every shard or the fused name '{lay.checkpoint_name}'"
        if self.tensors_quantized:
            if not lay.asked:
                why, fix = "it is built without the quantization config", "leave it unquantized"
            elif self.entries:
                why = f"{', '.join(repr(e) for e in self.entries)} matches the name vLLM asks about"
                fix = "remove or narrow that entry"
            else:
                why = f"vLLM never quantizes names containing {' or '.join(_ALWAYS_UNQUANTIZED_SUBSTRINGS)}"
                fix = "leave it unquantized"
            return f"{what}: vLLM builds it unquantized ({why}) but its tensors are NVFP4; {fix}"
        held = tensors or "absent (the tensors are unquantized)"
        return (
            f"{what}: vLLM builds it NVFP4 (no exclude entry matches the name vLLM asks about) but its NVFP4 "
            f"scales are {held}; add '{lay.checkpoint_name}' to exclude_modules (and config.json's ignore)"
        )


def disagreements(
    layers: Iterable[ConsumerLayer], quantized: Callable[[str], bool], exclusion: VllmExclusion
) -> list[Disagreement]:
    """Layers where vLLM's decision differs from the tensors (``quantized(member)`` says what they hold)."""
    out = []
    for lay in layers:
        states = {quantized(m) for m in lay.members}
        held = False if not states else (states.pop() if len(states) == 1 else None)
        try:
            vllm_q = exclusion.quantizes(lay)
            verdict = "NVFP4" if vllm_q else "unquantized"
        except PartlyExcludedFusedLayer as e:
            out.append(Disagreement(lay, held, f"refuses to load: {e}"))
            continue
        if held is None or vllm_q != held:
            entries = _entries_excluding(exclusion, lay.prefix) if held and not vllm_q else ()
            out.append(Disagreement(lay, held, verdict, entries))
    return out


def _entries_excluding(exclusion: VllmExclusion, prefix: str) -> tuple[str, ...]:
    """The raw list entries that, each on its own, make vLLM exclude ``prefix`` (for messages)."""
    found = []
    for raw in exclusion.raw:
        one = VllmExclusion([raw], exclusion.family)
        one.packed = exclusion.packed
        try:
            if one.excluded(prefix):
                found.append(raw)
        except PartlyExcludedFusedLayer:
            found.append(raw)
    return tuple(found)


class ExclusionMatcher:
    """The exclude list read against checkpoint module names: exact, then substring, then fnmatch, as
    ``is_layer_excluded`` reads it for a name vLLM does not fuse or rename (used for reference lists given
    to ``--exclude_config`` and for compressed-tensors checkpoints)."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = tuple(patterns)
        plain = [re.escape(p) for p in self.patterns if p]
        self._substring = re.compile("|".join(plain)) if plain else None
        wild = [fnmatch.translate(p) for p in self.patterns]
        self._wildcard = re.compile("|".join(f"(?:{w})" for w in wild)) if wild else None

    def __call__(self, module: str) -> bool:
        return bool(
            (self._substring and self._substring.search(module)) or (self._wildcard and self._wildcard.match(module))
        )


def load_reference_exclusions(path: str | os.PathLike) -> tuple[str, ...]:
    """``exclude_modules`` of an hf_quant_config.json, or ``ignore`` of a config.json's quantization_config
    (read with ``ExclusionMatcher``, as vLLM reads a list it does not fuse or rename)."""
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
