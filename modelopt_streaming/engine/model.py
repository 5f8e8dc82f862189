"""The model the engine runs, without building it: transformers' own causal-LM class instantiated on the meta
device from ``config.json`` (no memory), so every module (embedding, decoder layers, final norm, ``lm_head``)
is the class transformers would run, and one of them at a time is given real tensors, read through our index
and reader, on the device.

Checkpoint names map onto module parameters as transformers' own loading maps them
(``transformers/conversion_mapping.py``): per-expert ``experts.E.{gate,up,down}_proj.weight`` (Mixtral
``w1``/``w3``/``w2``) become the fused 3-D ``experts.gate_up_proj`` [E, 2I, H] (gate rows first) and
``experts.down_proj`` [E, H, I]; Mixtral's ``block_sparse_moe`` is the model's ``mlp``. The tests hold this
plain stack/concatenate path to transformers' full-model loading bit for bit.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from modelopt_streaming.errors import CheckpointError, UsageError
from modelopt_streaming.source.index import CheckpointIndex, TensorInfo
from modelopt_streaming.source.vendor import DecodedWeight, decoded_weights


# model_type of the text decoder -> how its checkpoint names its experts (gate, up, down leaves; None: the
# checkpoint stores 3-D experts as the module does) and the renames transformers applies on loading.
# Kimi-K2 / K2.5 report ``kimi_k2`` for a DeepSeek-V3 decoder, which transformers has no mapping for.
@dataclass(frozen=True)
class Family:
    model_type: str  # the transformers config class that runs it
    expert_leaves: tuple[str, str, str] | None
    renames: tuple[tuple[str, str], ...] = ()  # (checkpoint substring, module substring)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", None),
    "qwen3": Family("qwen3", None),
    "qwen3_moe": Family("qwen3_moe", ("gate_proj", "up_proj", "down_proj")),
    # conversion_mapping.py "mixtral": WeightRenaming(".block_sparse_moe.", ".mlp.") and w1/w3 -> gate_up_proj.
    "mixtral": Family("mixtral", ("w1", "w3", "w2"), renames=((".block_sparse_moe.", ".mlp."),)),
    "deepseek_v3": Family("deepseek_v3", ("gate_proj", "up_proj", "down_proj")),
    "kimi_k2": Family("deepseek_v3", ("gate_proj", "up_proj", "down_proj")),
    "gpt_oss": Family("gpt_oss", None),
}


def text_config_dict(config: dict) -> tuple[dict, str]:
    """The decoder's config of a checkpoint and the prefix of its tensor names: a multimodal config (Kimi-K2.5)
    nests it under ``text_config`` and names its tensors ``language_model.*``."""
    if isinstance(config.get("text_config"), dict) and config.get("model_type") not in FAMILIES:
        return config["text_config"], "language_model."
    return config, ""


def family_of_config(config: dict, where: str) -> Family:
    """The family the engine runs, or a UsageError naming the architecture, before any work."""
    text, _ = text_config_dict(config)
    model_type = text.get("model_type")
    if model_type not in FAMILIES:
        archs = ", ".join(config.get("architectures") or []) or str(model_type)
        raise UsageError(
            f"{where}: the engine does not run {archs} (model_type {model_type!r}); it runs "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


@dataclass
class Skeleton:
    """transformers' causal-LM model of the checkpoint on the meta device, and how its names meet the files."""

    model: torch.nn.Module
    config: object  # the transformers config the modules were built from
    family: Family
    prefix: str  # checkpoint-name prefix of the text model ("" or "language_model.")
    attn_implementation: str  # "sdpa" or "eager", as from_pretrained would pick it

    @property
    def decoder(self) -> torch.nn.Module:
        return self.model.model

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def checkpoint_name(self, module_name: str) -> str:
        """The checkpoint name of a module or parameter path of ``self.model``."""
        name = module_name
        for ckpt, mod in self.family.renames:
            name = name.replace(mod, ckpt)
        return self.prefix + name


def build_skeleton(
    config: dict,
    where: str,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
) -> Skeleton:
    """The model of ``config`` (a checkpoint's config.json) on the meta device.

    Args:
        config: the checkpoint's config.json.
        where: the checkpoint directory, for messages.
        dtype: the dtype the model runs in (the checkpoint's own: a float32 forward reproduces none of
            ModelOpt's calibration values).
        attn_implementation: transformers' attention implementation ("sdpa", "eager"), or "auto": sdpa where
            the model class supports it, else eager, as ``from_pretrained`` picks it.
        trust_remote_code: custom model code of the checkpoint is never run unless this is set.

    Raises:
        UsageError: an architecture the engine does not run, or custom code without ``trust_remote_code``.
    """
    import transformers

    family = family_of_config(config, where)
    text, prefix = text_config_dict(config)
    if text.get("auto_map") and not trust_remote_code:
        raise UsageError(f"{where}: config.json names custom model code (auto_map); it is never run here")
    fields = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "quantization_config")}
    tf_config = transformers.AutoConfig.for_model(family.model_type, **fields)
    if attn_implementation == "auto":
        model_class = transformers.AutoModelForCausalLM._model_mapping[type(tf_config)]
        attn_implementation = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    if attn_implementation not in ("sdpa", "eager"):
        raise UsageError(f"attention implementation {attn_implementation!r}: the engine runs sdpa or eager")
    # Set both explicitly: a config that did not pass through from_pretrained has neither, and then
    # create_causal_mask returns None and eager attention runs without a causal mask (../shared/engine.md).
    tf_config._attn_implementation = attn_implementation
    tf_config._experts_implementation = "eager"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tf_config, dtype=dtype)
    _keep_in_fp32(model, dtype)
    model.eval()
    return Skeleton(
        model=model, config=model.config, family=family, prefix=prefix, attn_implementation=attn_implementation
    )


def _keep_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The parameters and buffers ``from_pretrained`` keeps in float32 whatever the dtype asked for (the class's
    ``_keep_in_fp32_modules_strict`` for fp16 and bf16, ``_keep_in_fp32_modules`` for fp16:
    ``PreTrainedModel._get_dtype_plan``), e.g. DeepSeek-V3's ``e_score_correction_bias``: ``from_config`` casts
    them all, and a bf16 router bias routes tokens otherwise than the model does."""
    keep = set(model._get_dtype_plan(dtype)) if hasattr(model, "_get_dtype_plan") else set()
    if not keep:
        return
    pattern = re.compile(r"(?:^|\.)(?:" + "|".join(re.escape(k) for k in sorted(keep)) + r")(?:\.|$)")
    for module_name, module in model.named_modules():
        for registry in (module._parameters, module._buffers):
            for leaf, tensor in list(registry.items()):
                full = f"{module_name}.{leaf}" if module_name else leaf
                if tensor is not None and tensor.is_floating_point() and pattern.search(full):
                    value = tensor.to(torch.float32)
                    registry[leaf] = (
                        torch.nn.Parameter(value, tensor.requires_grad) if leaf in module._parameters else value
                    )


_EXPERT_PARAM = re.compile(r"^(?P<experts>.*\.experts)\.(?P<param>gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class ParamSource:
    """Where one module parameter comes from: one checkpoint tensor, or per-expert tensors stacked (each
    expert's gate and up concatenated along the output rows first)."""

    param: str  # name inside the module
    tensors: tuple[tuple[TensorInfo | DecodedWeight, ...], ...]  # per expert: (gate, up) or (down,); or ((t,),)
    stacked: bool


def param_sources(
    skeleton: Skeleton,
    index: CheckpointIndex,
    module: torch.nn.Module,
    module_name: str,
    decoded: dict[str, DecodedWeight] | None = None,
    lookup: Callable[[str], object | None] | None = None,
) -> list[ParamSource]:
    """The checkpoint tensors of every parameter and persistent buffer of ``module`` (named ``module_name``
    in ``skeleton.model``), checked for presence before anything is read. ``decoded``: the checkpoint's vendor
    encodings (``source.vendor.decoded_weights``), which stand in for their parts under the weight's name.

    ``lookup`` (checkpoint name -> what ``materialize``'s ``read`` is given, or None when absent) replaces the
    source lookup (a tensor of the index, or a vendor-decoded weight): a quantized checkpoint's own.

    Raises:
        CheckpointError: a tensor the module needs is missing from the checkpoint (the first one named).
    """
    if lookup is None:
        known = decoded if decoded is not None else decoded_weights(index)

        def lookup(name: str) -> TensorInfo | DecodedWeight | None:
            return _lookup(index, known, name)

    out = []
    for param in module.state_dict(keep_vars=True):
        full = f"{module_name}.{param}" if module_name else param
        ckpt = skeleton.checkpoint_name(full)
        hit = lookup(ckpt)
        if hit is not None:
            out.append(ParamSource(param, ((hit,),), stacked=False))
            continue
        m = _EXPERT_PARAM.match(full)
        leaves = skeleton.family.expert_leaves
        if m is None or leaves is None:
            raise CheckpointError(f"{index.root}: tensor {ckpt!r} is missing (the model's {full})")
        experts_ckpt = skeleton.checkpoint_name(m["experts"])
        n = getattr(module, "num_experts", None) or _num_experts(module, m["experts"], module_name)
        wanted = leaves[:2] if m["param"] == "gate_up_proj" else leaves[2:]
        per_expert = []
        for e in range(n):
            names = [f"{experts_ckpt}.{e}.{leaf}.weight" for leaf in wanted]
            found = [lookup(x) for x in names]
            missing = [x for x, f in zip(names, found) if f is None]
            if missing:
                raise CheckpointError(f"{index.root}: tensor {missing[0]!r} is missing (the model's {full})")
            per_expert.append(tuple(found))
        out.append(ParamSource(param, tuple(per_expert), stacked=True))
    return out


def _num_experts(module: torch.nn.Module, experts_name: str, module_name: str) -> int:
    rel = experts_name[len(module_name) + 1 :] if module_name else experts_name
    return module.get_submodule(rel).num_experts


def _lookup(index: CheckpointIndex, decoded: dict[str, DecodedWeight], name: str) -> TensorInfo | DecodedWeight | None:
    return decoded.get(name) or index.tensors.get(name)


def materialize(
    module: torch.nn.Module,
    sources: list[ParamSource],
    read: Callable[[TensorInfo | DecodedWeight, torch.device], torch.Tensor],
    device: torch.device,
    on_host: frozenset[str] = frozenset(),
    workers: int = 1,
) -> torch.nn.Module:
    """``module`` with real tensors: each parameter read (``read(tensor, device)``: a source tensor as stored,
    decoded to bf16 when it is a vendor encoding, on ``device`` or where the caller's reader puts it) and cast
    to the dtype the module declares, on ``device`` (the parameters named in ``on_host`` in host memory,
    page-locked when ``device`` is a GPU). Fused experts are filled expert by expert into one tensor, so a
    layer never needs twice its experts' memory.

    ``workers`` > 1 reads that many checkpoint tensors at once: a DeepSeek-V3 MoE layer is 768 expert tensors
    of 29 MB, each too small for the reader's own parallel pieces, and read one after the other they came at
    1.6 GB/s from RAM-backed storage on an H100 host (docs/benchmarks.md section 7). Where each tensor lands is
    fixed by its place in the module, so the bytes are the same in any order of completion."""
    want = module.state_dict(keep_vars=True)
    reads: list[tuple[int, int, int, TensorInfo | DecodedWeight, torch.device]] = []  # (source, expert, row, ..)
    values: list[torch.Tensor | None] = []
    for k, src in enumerate(sources):
        meta = want[src.param]
        target = torch.device("cpu") if src.param in on_host else device
        if not src.stacked:
            values.append(None)
            reads.append((k, -1, 0, src.tensors[0][0], target))
            continue
        pin = target.type == "cpu" and device.type == "cuda"
        values.append(torch.empty(meta.shape, dtype=meta.dtype, device=target, pin_memory=pin))
        if len(src.tensors) > meta.shape[0]:
            raise CheckpointError(
                f"tensor {src.tensors[meta.shape[0]][0].name!r}: {src.param!r} {list(meta.shape)} has "
                f"{meta.shape[0]} experts, the checkpoint more"
            )
        for e, parts in enumerate(src.tensors):
            row = 0
            for info in parts:
                reads.append((k, e, row, info, target))
                row += info.shape[0]
            if row != meta.shape[1]:
                raise CheckpointError(f"{src.param!r}: expert {e} has {row} rows, the model expects {meta.shape[1]}")
    for (k, e, row, info, target), part in _read_all(reads, read, workers):
        src, value = sources[k], values[k]
        if e < 0:
            values[k] = part.to(target)
            continue
        if tuple(part.shape[1:]) != tuple(value.shape[2:]):
            raise CheckpointError(
                f"tensor {info.name!r}: shape {list(part.shape)} does not fit {src.param!r} {list(value.shape)}"
            )
        value[e, row : row + part.shape[0]] = part.to(target)
    state = {}
    for src, value in zip(sources, values):
        meta = want[src.param]
        if tuple(value.shape) != tuple(meta.shape):
            raise CheckpointError(
                f"tensor for {src.param!r}: shape {list(value.shape)}, the model expects {list(meta.shape)}"
            )
        state[src.param] = value.to(meta.dtype)
    module.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: they are computed by __init__.
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise CheckpointError(f"buffer {name!r} of {type(module).__name__} has no value on the meta device")
    return module


def _read_all(reads: list, read: Callable, workers: int) -> Iterator[tuple[tuple, torch.Tensor]]:
    """``(entry, read(tensor, target))`` for each entry of ``reads``, in order, with at most ``2 * workers``
    reads in flight (and so in memory) at once."""
    if workers <= 1:
        for entry in reads:
            yield entry, read(entry[3], entry[4])
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine-read") as pool:
        pending: deque = deque()
        try:
            for entry in reads:
                pending.append((entry, pool.submit(read, entry[3], entry[4])))
                if len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()
