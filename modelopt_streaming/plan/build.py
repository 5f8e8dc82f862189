"""Plan: a pure function of the index and the recipe.

It decides, for every tensor, whether it is copied or quantized, groups the weights that must share
one ``weight_scale_2`` (fused groups, wherever their shards are), lays the output tensors out in
shards, and so already knows the output size and every count that validation will later find.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

from modelopt_streaming.consumers import ExclusionMatcher
from modelopt_streaming.errors import CheckpointError
from modelopt_streaming.formats.interchange import EXPERTS_3D_SUFFIXES, LEAVES, SCALAR_SHAPE
from modelopt_streaming.formats.names import FUSED_EXPERTS, experts_of
from modelopt_streaming.formats.nvfp4 import BLOCK_SIZE
from modelopt_streaming.plan.names import KIND_ORDER, default_exclusion, fusion_key, module_kind
from modelopt_streaming.source.index import FLOAT_DTYPES, CheckpointIndex, TensorInfo, TensorSpec
from modelopt_streaming.source.vendor import DecodedWeight, decoded_weights

__all__ = [
    "CopyUnit",
    "Plan",
    "QuantizeUnit",
    "Recipe",
    "Scope",
    "Shard",
    "Unit",
    "build_plan",
    "unit_sources",
]

Scope = Literal["all", "mlp", "experts"]


@dataclass(frozen=True)
class Recipe:
    """What to quantize and how; every option that changes output bytes lives here."""

    scope: Scope = "all"
    exclude: tuple[str, ...] = ()
    reference_exclude: tuple[str, ...] = ()
    weight_only: bool = False
    scale_math: Literal["cuda", "cpu"] = "cuda"
    max_shard_size: int = 5 * 10**9
    # Output dialect: ModelOpt names, or compressed-tensors ``nvfp4-pack-quantized`` (the same codes and block
    # scales, other names, reciprocal global scales; interchange.py).
    format: Literal["modelopt", "compressed-tensors"] = "modelopt"
    # ``input_scale`` by module, from a reference checkpoint (--input_scales_from) or calibration
    # (--calib_data); other modules get 1.0.
    input_scales: tuple[tuple[str, float], ...] = ()
    # FP8 KV cache: None, "fp8_cast" (the config says FP8, no scale tensors: ModelOpt's constant-amax mode) or
    # "fp8" (calibrated: the plan writes each attention layer's ``k_proj.k_scale`` / ``v_proj.v_scale``, whose
    # values ``kv_scales`` holds once the calibration has run).
    kv_cache: Literal["fp8", "fp8_cast"] | None = None
    kv_scales: tuple[tuple[str, float], ...] = ()
    # What identifies a calibrated run's scales before they are measured (the data's digest and how the
    # engine runs): the resume fingerprint holds this, the measured values are filled in afterwards.
    calibration: str = ""
    # How block scales are chosen (codec.ALGORITHMS) and the settings its bytes depend on
    # (codec.algorithm_settings), as (key, value) pairs: the plan is the same, the codes and scales differ.
    algorithm: str = "rtn"
    algorithm_settings: tuple[tuple[str, object], ...] = ()

    @functools.cached_property
    def kv_scale_of(self) -> dict[str, float]:
        return dict(self.kv_scales)

    @functools.cached_property
    def input_scale_of(self) -> dict[str, float]:
        return dict(self.input_scales)


@dataclass(frozen=True)
class CopyUnit:
    """One tensor written unchanged, or (a DecodedWeight) decoded to bf16 and written unquantized."""

    source: TensorInfo | DecodedWeight

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        s = self.source
        return (TensorSpec(s.name, s.dtype, s.shape),)

    @property
    def position(self) -> tuple[str, int]:
        return (self.source.file, self.source.begin)


@dataclass(frozen=True)
class QuantizeUnit:
    """One weight, or a fused group whose members share one ``weight_scale_2``."""

    fusion: str | None  # "gate/up", "q/k/v", ... or None for a lone weight
    modules: tuple[str, ...]
    sources: tuple[TensorInfo | DecodedWeight, ...]
    with_input_scale: bool
    # "linear": 2-D [out, in] weights written as ``X.weight`` + ``X.weight_scale`` ...; "experts_3d": one
    # fused 3-D experts tensor [E, in, out] (``modules`` holds its tensor name X), written the way
    # ModelOpt 0.47 exports GPT-OSS/Llama-4 experts: X uint8 [E, in/2, out], X_weight_scale [E, in/16, out],
    # one X_weight_scale_2 and X_input_scale for the whole tensor.
    layout: Literal["linear", "experts_3d"] = "linear"
    # Tensor names and scalar shapes of ``Recipe.format`` (interchange.LEAVES); "linear" layout only.
    dialect: Literal["modelopt", "compressed-tensors"] = "modelopt"

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        if self.layout == "experts_3d":
            (name,), (src,) = self.modules, self.sources
            n_exp, n_in, n_out = src.shape
            out = [
                TensorSpec(name, "U8", (n_exp, n_in // 2, n_out)),
                TensorSpec(name + EXPERTS_3D_SUFFIXES["weight_scale"], "F8_E4M3", (n_exp, n_in // BLOCK_SIZE, n_out)),
                TensorSpec(name + EXPERTS_3D_SUFFIXES["global"], "F32", ()),
            ]
            if self.with_input_scale:
                out.append(TensorSpec(name + EXPERTS_3D_SUFFIXES["input"], "F32", ()))
            return tuple(out)
        out = []
        leaf, scalar = LEAVES[self.dialect], SCALAR_SHAPE[self.dialect]
        for module, src in zip(self.modules, self.sources):
            n_out, n_in = src.shape
            out.append(TensorSpec(f"{module}.{leaf['weight']}", "U8", (n_out, n_in // 2)))
            out.append(TensorSpec(f"{module}.{leaf['weight_scale']}", "F8_E4M3", (n_out, n_in // BLOCK_SIZE)))
            out.append(TensorSpec(f"{module}.{leaf['global']}", "F32", scalar))
            if self.with_input_scale:
                out.append(TensorSpec(f"{module}.{leaf['input']}", "F32", scalar))
        return tuple(out)

    @property
    def position(self) -> tuple[str, int]:
        return min((s.file, s.begin) for s in self.sources)

    def encoded_names(self) -> list[tuple[str, str, str]]:
        """(module, packed codes tensor, weight_scale_2 tensor) of each member, as ``outputs`` names them."""
        if self.layout == "experts_3d":
            return [(m, m, m + EXPERTS_3D_SUFFIXES["global"]) for m in self.modules]
        leaf = LEAVES[self.dialect]
        return [(m, f"{m}.{leaf['weight']}", f"{m}.{leaf['global']}") for m in self.modules]


@dataclass(frozen=True)
class ScalarUnit:
    """One float32 0-dim tensor the source does not have, whose value the recipe gives when it is written
    (a KV-cache scale, ``Recipe.kv_scale_of``), placed beside the tensors of ``anchor`` (the source position
    of the module it belongs to) in the output."""

    name: str
    anchor: tuple[str, int]

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(self.name, "F32", ()),)

    @property
    def position(self) -> tuple[str, int]:
        return self.anchor


Unit = CopyUnit | QuantizeUnit | ScalarUnit


@dataclass(frozen=True)
class Shard:
    file: str
    units: tuple[Unit, ...]

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(t for u in self.units for t in u.outputs)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    @property
    def input_bytes(self) -> int:
        return sum(src.nbytes for u in self.units for src in unit_sources(u))


@dataclass
class Plan:
    recipe: Recipe
    shards: list[Shard]
    quantized: dict[str, str]  # module -> kind
    unquantized: dict[str, str]  # Linear-like module left in source precision -> reason
    linear_modules: list[str]  # every module with a >=2-D weight, quantized or not
    warnings: list[str] = field(default_factory=list)

    @property
    def units(self) -> list[Unit]:
        return [u for s in self.shards for u in s.units]

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def input_bytes(self) -> int:
        return sum(src.nbytes for u in self.units for src in unit_sources(u))

    def fused_group_counts(self) -> dict[str, int]:
        counts = Counter(u.fusion for u in self.units if isinstance(u, QuantizeUnit) and u.fusion)
        return dict(sorted(counts.items()))

    def unquantized_reason_counts(self) -> dict[str, int]:
        """Unquantized modules by the category of their reason (the text before any ':' detail)."""
        counts = Counter(reason.split(":")[0] for reason in self.unquantized.values())
        return dict(counts.most_common())

    def quantized_kind_counts(self) -> dict[str, int]:
        counts = Counter(self.quantized.values())
        return {k: counts[k] for k in KIND_ORDER if counts[k]}

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.file for s in self.shards for t in s.outputs}


def unit_sources(unit: Unit) -> tuple[TensorInfo | DecodedWeight, ...]:
    """The source tensors a unit reads."""
    if isinstance(unit, ScalarUnit):
        return ()
    return (unit.source,) if isinstance(unit, CopyUnit) else unit.sources


def _config_int(config: dict, key: str) -> int | None:
    """An integer of the language model's config, at the top level or nested (multimodal configs)."""
    for cfg in (config, config.get("text_config") or {}, config.get("language_config") or {}):
        n = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(n, int):
            return n
    return None


def _num_hidden_layers(config: dict) -> int | None:
    return _config_int(config, "num_hidden_layers")


def _check_experts_layout(index: CheckpointIndex, experts_3d: dict[str, TensorInfo | DecodedWeight]) -> None:
    """3-D experts must keep the input dimension in the middle, as GPT-OSS and Llama-4 store them
    (``gate_up_proj`` [E, hidden, 2 * inter], ``down_proj`` [E, inter, hidden]); an [E, out, in] tensor of the
    same name would get its blocks along the wrong dimension, so it is refused rather than guessed at."""
    hidden = _config_int(index.config, "hidden_size")
    if hidden is None:
        return
    for name, info in experts_3d.items():
        leaf = name.rpartition(".")[2]
        dim = 1 if leaf == "gate_up_proj" else 2
        if info.shape[dim] != hidden:
            expected = "[experts, hidden, 2 * intermediate]" if dim == 1 else "[experts, intermediate, hidden]"
            raise CheckpointError(
                f"{index.root / info.file}, tensor {name!r}: shape {list(info.shape)} is not {expected} with "
                f"hidden_size {hidden} (the input dimension in the middle, as GPT-OSS and Llama-4 store experts)"
            )


def build_plan(index: CheckpointIndex, recipe: Recipe) -> Plan:
    """Every unit of work for one checkpoint and recipe, laid out in output shards; reads no tensor data.

    Args:
        index: the source checkpoint's tensors and config.
        recipe: what to quantize and how.

    Returns:
        The plan: shards of units in source order, which modules are quantized (with their kind) and which
        Linear modules are not (with the reason), and warnings for fused groups and MoE layers left wholly
        unquantized because one member was.

    Raises:
        CheckpointError: a weight the recipe would quantize has a non-float dtype, or fused 3-D experts do
            not keep the input dimension in the middle.
    """
    num_layers = _num_hidden_layers(index.config)
    decoded = decoded_weights(index)
    consumed = {p.name for d in decoded.values() for p in d.parts}
    weights = {
        name[: -len(".weight")]: decoded.get(name, info)
        for name, info in index.tensors.items()
        if name.endswith(".weight") and len(info.shape) >= 2
    }
    weights.update({name[: -len(".weight")]: d for name, d in decoded.items() if d.encoding == "int4_pack"})
    # 3-D fused experts are named by their tensor (ModelOpt's export keeps that name for the packed codes).
    # A decoded source (MXFP4 ``X_blocks`` + ``X_scales``) stands in for its parts under the name X.
    experts_3d = {
        name: info
        for name, info in {**index.tensors, **decoded}.items()
        if FUSED_EXPERTS.match(name) and len(info.shape) == 3
    }
    _check_experts_layout(index, experts_3d)
    weights.update(experts_3d)
    # Other float tensors of two or more dims without the ``.weight`` name (DBRX keeps its experts as 2-D
    # ``ffn.experts.mlp.w1``): copied unquantized, and listed like any unquantized Linear, never left out.
    unrecognised = {
        name: info
        for name, info in index.tensors.items()
        if len(info.shape) >= 2
        and info.dtype in FLOAT_DTYPES
        and not name.endswith((".weight", "bias"))
        and name not in weights
        and name not in consumed
    }
    weights.update(unrecognised)
    weight_tensor = {m: m if m in experts_3d or m in unrecognised else f"{m}.weight" for m in weights}
    reference_excluded = ExclusionMatcher(recipe.reference_exclude)
    reasons: dict[str, str] = {}
    for module, info in weights.items():
        reason = default_exclusion(module, num_layers)
        kind = module_kind(module)
        if reason is None and module in unrecognised:
            reason = "not a Linear weight this tool quantizes (no .weight name)"
        # The input dimension: blocks of 16 run along it (the middle one of a 3-D experts tensor).
        n_in = info.shape[1] if len(info.shape) >= 2 else 0
        if reason is None and len(info.shape) != 2 and module not in experts_3d:
            reason = f"not a 2-D weight: {len(info.shape)}-D"
        if reason is None and n_in % BLOCK_SIZE:
            reason = f"input dim not a multiple of {BLOCK_SIZE}: {n_in}"
        if reason is None and recipe.scope == "mlp" and kind not in ("dense_mlp", "shared_expert", "routed_expert"):
            reason = "outside --mlp_only scope"
        if reason is None and recipe.scope == "experts" and kind != "routed_expert":
            reason = "outside --experts_only scope"
        if reason is None:
            for pattern in recipe.exclude:
                if fnmatch.fnmatchcase(module, pattern):
                    reason = f"--exclude: {pattern}"
                    break
        if reason is None and reference_excluded(module):
            reason = "excluded by the reference config"
        if reason is None and info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{index.root / info.file}, tensor {info.name!r}: source dtype {info.dtype} is not "
                "supported for quantization (bf16, fp16 or fp32 expected)"
            )
        if reason is not None:
            reasons[module] = reason

    warnings: list[str] = []
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module in weights:
        key = fusion_key(module)
        if key:
            groups[key].append(module)
    # Exclusion is all or nothing per fused group: vLLM refuses a partly quantized fused layer.
    for (kind, parent), members in groups.items():
        excluded = [m for m in members if m in reasons]
        if excluded and len(excluded) < len(members):
            why = f"fused partner unquantized: {kind} partner {excluded[0]} ({reasons[excluded[0]]})"
            for m in members:
                reasons.setdefault(m, why)
            warnings.append(f"{parent}: {kind} group left wholly unquantized: {why}")
    # One unquantized routed expert makes vLLM treat the whole MoE layer as unquantized.
    moe_layers: dict[str, list[str]] = defaultdict(list)
    for module in weights:
        moe = experts_of(module)
        if moe:
            moe_layers[moe].append(module)
    for layer, members in moe_layers.items():
        excluded = [m for m in members if m in reasons]
        if excluded and len(excluded) < len(members):
            why = f"MoE layer partly unquantized: expert weight {excluded[0]} ({reasons[excluded[0]]})"
            for m in members:
                reasons.setdefault(m, why)
            warnings.append(f"{layer}: routed experts left wholly unquantized: {why}")

    units: list[Unit] = []
    grouped: set[str] = set()
    for (kind, _parent), members in groups.items():
        if len(members) < 2 or members[0] in reasons:
            continue
        members.sort(key=lambda m: (weights[m].file, weights[m].begin))
        units.append(
            QuantizeUnit(
                kind,
                tuple(members),
                tuple(weights[m] for m in members),
                not recipe.weight_only,
                dialect=recipe.format,
            )
        )
        grouped.update(members)
    for module, info in weights.items():
        if module not in reasons and module not in grouped:
            layout = "experts_3d" if module in experts_3d else "linear"
            units.append(QuantizeUnit(None, (module,), (info,), not recipe.weight_only, layout, recipe.format))
    quantized_weights = {weight_tensor[m] for m in weights if m not in reasons}
    for name, d in decoded.items():
        if name not in quantized_weights:
            units.append(CopyUnit(d))  # an FP8 or INT4 source weight left unquantized is written as bf16
    for name, info in index.tensors.items():
        if name not in quantized_weights and name not in consumed and name not in decoded:
            units.append(CopyUnit(info))
    units += _kv_scale_units(index, recipe)
    units.sort(key=lambda u: (u.position, _first_output(u)))

    quantized = {m: module_kind(m) for m in weights if m not in reasons}
    return Plan(
        recipe=recipe,
        shards=_lay_out_shards(units, recipe.max_shard_size),
        quantized=quantized,
        unquantized=dict(sorted(reasons.items())),
        linear_modules=sorted(weights),
        warnings=warnings,
    )


_DECODER_ATTENTION = re.compile(r"^(.*(?:^|\.)layers\.(\d+)\.self_attn)\.")


def _kv_scale_units(index: CheckpointIndex, recipe: Recipe) -> list[ScalarUnit]:
    """With a calibrated FP8 KV cache, ``k_proj.k_scale`` and ``v_proj.v_scale`` of every decoder layer's
    attention (``...layers.N.self_attn``, MTP layers past ``num_hidden_layers`` aside), the names ModelOpt
    0.47's export gives them whatever the attention is (MLA too), each placed at the first tensor of its
    attention module in the source, so it lands in that layer's shard."""
    if recipe.kv_cache != "fp8":
        return []
    num_layers = _num_hidden_layers(index.config)
    first: dict[str, tuple[str, int]] = {}
    for name, info in index.tensors.items():
        m = _DECODER_ATTENTION.match(name)
        if m and (num_layers is None or int(m[2]) < num_layers):
            first[m[1]] = min(first.get(m[1], (info.file, info.begin)), (info.file, info.begin))
    return [
        ScalarUnit(f"{attention}.{leaf}", anchor)
        for attention, anchor in sorted(first.items())
        for leaf in ("k_proj.k_scale", "v_proj.v_scale")
    ]


def _first_output(unit: Unit) -> str:
    return unit.outputs[0].name


def _lay_out_shards(units: list[Unit], max_shard_size: int) -> list[Shard]:
    """Greedy, in unit order; a unit never straddles two shards, so shards can be split between workers."""
    bins: list[list[Unit]] = []
    size = 0
    for unit in units:
        unit_bytes = sum(t.nbytes for t in unit.outputs)
        if not bins or (size + unit_bytes > max_shard_size and bins[-1]):
            bins.append([])
            size = 0
        bins[-1].append(unit)
        size += unit_bytes
    n = len(bins)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(b)) for i, b in enumerate(bins)]
