"""A quantized NVFP4 checkpoint run by the engine as the serving engine's emulation runs it: the architecture is
the source's (its ``config.json``), every parameter comes from the quantized files.

- An NVFP4 weight (ModelOpt ``X.weight``/``X.weight_scale``/``X.weight_scale_2``, compressed-tensors
  ``X.weight_packed``/``X.weight_scale``/``X.weight_global_scale``, ModelOpt 0.47's 3-D fused experts ``X``,
  ``X_weight_scale``, ``X_weight_scale_2``) is dequantized exactly, ``E2M1[code] * fp32(block scale) * global
  scale`` in float32, then cast to the compute dtype: vLLM 0.32's NVFP4 emulation
  (``model_executor/layers/quantization/utils/nvfp4_emulation_utils.py`` ``dequantize_to_dtype``), whose
  global scale is ``weight_scale_2`` for ModelOpt and ``1.0 / weight_global_scale`` (float32) for
  compressed-tensors (``compressed_tensors_w4a4_nvfp4.py`` ``process_weights_after_loading``).
- Per-expert checkpoint modules are stacked into the fused 3-D parameters as the source is
  (``engine.model.param_sources``).
- Every other parameter (norms, embeddings, routers, unquantized projections) is read from the quantized
  checkpoint, never from the source, so a producer that damaged one is measured.
- W4A4: the input of each quantized Linear is quantize-dequantized per 16 values with its stored input scale, as
  vLLM's emulation kernel does (``ref_nvfp4_quant_dequant``, run by ``run_nvfp4_emulations``; global scale
  ``1.0 / input_scale`` for ModelOpt, ``modelopt.py`` ``input_global_scale_inv``, the stored
  ``input_global_scale`` for compressed-tensors), as forward pre-hooks. Fused experts have no Linear: our experts
  implementation quantizes each expert's gate/up input and down input with the experts module's one global
  scale per projection, ``1.0 / max`` over the experts' input scales, as vLLM's emulated NVFP4 MoE takes it
  (``fused_moe/oracle/nvfp4.py`` ``convert_to_nvfp4_moe_kernel_format``, then ``moe_kernel_quantize_input``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from modelopt_streaming.codec.nvfp4 import dequantize, e2m1_codes
from modelopt_streaming.consumers.vllm import FUSED_LINEARS_OF_LEAF
from modelopt_streaming.engine.model import materialize, param_sources
from modelopt_streaming.engine.runner import EngineOptions, LayerStream
from modelopt_streaming.errors import CheckpointError, UsageError
from modelopt_streaming.formats.interchange import COMPRESSED_TENSORS, LEAVES, MODELOPT
from modelopt_streaming.formats.nvfp4 import BLOCK_SIZE, E2M1_VALUES
from modelopt_streaming.source.index import CheckpointIndex, TensorInfo
from modelopt_streaming.source.quantized import detect_format, nvfp4_modules
from modelopt_streaming.source.reader import TensorReader

ACT_QUANT_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class QuantizedWeight:
    """One NVFP4 weight of the checkpoint, standing for the parameter ``name``."""

    name: str
    packed: TensorInfo
    scale: TensorInfo
    global_scale: TensorInfo
    fmt: str
    three_d: bool  # ModelOpt 0.47's fused experts [E, in/2, out]

    @property
    def shape(self) -> tuple[int, ...]:
        if self.three_d:
            e, half_in, out = self.packed.shape
            return (e, half_in * 2, out)
        return (self.packed.shape[0], self.packed.shape[1] * 2)


def fake_quant_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``x`` per 16 values along its last dimension, in ``x``'s dtype: vLLM 0.32's
    ``ref_nvfp4_quant_dequant`` (``ref_nvfp4_quant`` then the dequantization), operation by operation.
    ``global_scale``: float32, one element (vLLM's input global scale, ``1 / input_scale``)."""
    shape, dtype = x.shape, x.dtype
    gs = global_scale.to(device=x.device, dtype=torch.float32).reshape(())
    blocks = x.reshape(-1, shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    vec_max = blocks.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    scale = gs * (vec_max * (1 / 6.0))
    scale = torch.clamp(scale, max=448, min=-448).to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = _reciprocal(scale * _reciprocal(gs))
    scaled = torch.clamp(blocks.to(torch.float32) * output_scale, -6.0, 6.0)
    # vLLM's cast_to_fp4 rounds to the nearest E2M1 magnitude with ties to the even code: the codec's rule.
    codes = e2m1_codes(scaled)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    values = table[(codes & 7).long()] * torch.sign(scaled)
    return (values * (scale / gs)).reshape(shape).to(dtype)


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    # vLLM's get_reciprocal: 1 / x, and 1e-8 for 0.
    return 1.0 / (x + (x == 0) * 1e8)


class QuantizedCheckpoint:
    """What an NVFP4 checkpoint holds, by the parameter names of the source's model."""

    def __init__(self, index: CheckpointIndex):
        self.index = index
        fmt = detect_format(index.config, index.tensors, index.root)
        if fmt is None:
            raise UsageError(
                f"--checkpoint {index.root}: not an NVFP4 checkpoint (no hf_quant_config.json, no ModelOpt or "
                "compressed-tensors nvfp4-pack-quantized quantization_config, no packed NVFP4 weights)"
            )
        self.fmt = fmt
        self.weights: dict[str, QuantizedWeight] = {}
        self.input_scales: dict[str, TensorInfo] = {}  # parameter name -> its module's input scale tensor
        self.consumed: set[str] = set()
        for module, roles in nvfp4_modules(index.tensors, fmt).items():
            packed = roles["weight"]
            if "weight_scale" not in roles or "global" not in roles:
                raise CheckpointError(
                    f"{index.root / packed.file}, tensor {packed.name!r}: packed NVFP4 weight without its "
                    f"{LEAVES[fmt]['weight_scale']} and {LEAVES[fmt]['global']}"
                )
            name = f"{module}.weight"
            self.weights[name] = QuantizedWeight(name, packed, roles["weight_scale"], roles["global"], fmt, False)
            if "input" in roles:
                self.input_scales[name] = roles["input"]
            self.consumed.update(r.name for r in roles.values())
        if fmt == MODELOPT:
            for name, info in index.tensors.items():
                scale = index.tensors.get(f"{name}_weight_scale")
                if info.dtype != "U8" or len(info.shape) != 3 or scale is None:
                    continue
                global_scale = index.tensors.get(f"{name}_weight_scale_2")
                if global_scale is None:
                    raise CheckpointError(f"{index.root / info.file}, tensor {name!r}: no {name}_weight_scale_2")
                self.weights[name] = QuantizedWeight(name, info, scale, global_scale, fmt, True)
                self.consumed.update((name, scale.name, global_scale.name))
                if f"{name}_input_scale" in index.tensors:
                    self.input_scales[name] = index.tensors[f"{name}_input_scale"]
                    self.consumed.add(f"{name}_input_scale")
        if not self.weights:
            raise UsageError(f"--checkpoint {index.root}: no NVFP4 weights in it (an unquantized checkpoint?)")
        # parameter -> (members whose scales vLLM collapses into the one it uses for this parameter, rule)
        self.scale_groups: dict[str, tuple[tuple[str, ...], str]] = {}
        for name in self.weights:
            parent, _, leaf = name.removesuffix(".weight").rpartition(".")
            members = FUSED_LINEARS_OF_LEAF.get(leaf)
            # An expert's gate and up go to the fused MoE's w13, not to a fused linear.
            if members is None or not name.endswith(".weight") or _PER_EXPERT.match(name):
                continue
            group = tuple(f"{parent}.{m}.weight" for m in members[0])
            if all(g in self.weights for g in group):
                self.scale_groups[name] = (group, "max")

    def share_expert_gate_scales(self, leaves: tuple[str, str, str] | None) -> None:
        """Per-expert checkpoints: vLLM's fused MoE loads each expert's gate and up into one w13 and uses the
        gate's global scale for both (modelopt.py ``w13_weight_scale_2[:, 0]``, compressed_tensors_moe_w4a4_nvfp4.py
        ``w13_weight_global_scale[:, 0]``; a mismatch only logs "w1_weight_scale_2 must match w3_weight_scale_2")."""
        if leaves is None:
            return
        gate, up, _down = leaves
        for name in self.weights:
            match = _PER_EXPERT.match(name)
            if match is None or match["leaf"] != up:
                continue
            gate_name = f"{match['expert']}.{gate}.weight"
            if gate_name in self.weights:
                self.scale_groups[name] = ((gate_name,), "first")

    def declares_w4a4(self) -> bool | None:
        """What the checkpoint's config says: True (NVFP4 weights and activations), False (weight-only), None."""
        root = self.index.root
        if self.fmt == MODELOPT and (root / "hf_quant_config.json").is_file():
            try:
                algo = json.loads((root / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
            except (ValueError, KeyError, TypeError):
                algo = None
        else:
            qc = self.index.config.get("quantization_config") or {}
            algo = qc.get("quant_algo")
            if self.fmt == COMPRESSED_TENSORS:
                groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
                if groups:
                    return any(g.get("input_activations") for g in groups)
        if algo == "NVFP4":
            return True
        if algo == "W4A16_NVFP4":
            return False
        return None

    def resolve_act_quant(self, mode: str) -> bool:
        if mode not in ACT_QUANT_MODES:
            raise UsageError(f"--act_quant {mode!r}: one of {', '.join(ACT_QUANT_MODES)}")
        if mode == "off":
            return False
        declared = self.declares_w4a4()
        on = mode == "on" or (declared if declared is not None else bool(self.input_scales))
        if on:
            missing = sorted(set(self.weights) - set(self.input_scales))
            if missing:
                raise CheckpointError(
                    f"--checkpoint {self.index.root}: activations are NVFP4 (--act_quant {mode}) but "
                    f"{missing[0]!r} has no input scale"
                )
        return on

    def lookup(self, name: str) -> QuantizedWeight | TensorInfo | None:
        hit = self.weights.get(name)
        if hit is not None:
            return hit
        info = self.index.tensors.get(name)
        if info is not None and info.name in self.consumed:
            return None
        return info

    def read(
        self, reader: TensorReader, item: QuantizedWeight | TensorInfo, device: torch.device | None = None
    ) -> torch.Tensor:
        """A parameter's value: a stored tensor as it is, an NVFP4 weight dequantized. With a CUDA ``device`` the
        packed codes and scales are read to it and dequantized there: the dequantization is two elementwise
        float32 products and a cast, each correctly rounded on either device, so the bits are the CPU's (a
        DeepSeek-V3 MoE layer dequantized on the host took most of a 39 s layer, docs/benchmarks.md)."""
        gpu = device if device is not None and device.type == "cuda" else None
        if not isinstance(item, QuantizedWeight):
            return reader.read(item, device=gpu)
        packed, scale = reader.read(item.packed, device=gpu), reader.read(item.scale, device=gpu)
        global_scale = self.weight_global_scale(reader, item).to(packed.device)
        if not item.three_d:
            return dequantize(packed, scale, global_scale)
        # [E, in/2, out] codes packed along ``in``: each expert is the 2-D weight [out, in] transposed.
        return torch.stack(
            [
                dequantize(packed[e].t().contiguous(), scale[e].t().contiguous(), global_scale).t()
                for e in range(len(packed))
            ]
        )

    def collapsed_groups(self, reader: TensorReader) -> list[str]:
        """The parameters whose stored global (or, for a fused linear, input) scale differs from the one vLLM
        runs them with: producers that did not share one scale per fused group, which vLLM serves with the
        group's (with a warning in its log only)."""
        out = []
        for name, (members, rule) in self.scale_groups.items():
            own = self.weights[name]
            used = self.weight_global_scale(reader, own)
            alone = reader.read(own.global_scale).to(torch.float32).reshape(())
            if own.fmt == COMPRESSED_TENSORS:
                alone = (1.0 / alone).to(torch.float32)
            differs = not torch.equal(used, alone)
            if rule == "max" and name in self.input_scales and all(m in self.input_scales for m in members):
                stored = reader.read(self.input_scales[name]).to(torch.float32).reshape(())
                group = torch.stack([reader.read(self.input_scales[m]).to(torch.float32).reshape(()) for m in members])
                differs = differs or not torch.equal(stored, group.max())
            if differs:
                out.append(name)
        return sorted(out)

    def weight_global_scale(self, reader: TensorReader, item: QuantizedWeight) -> torch.Tensor:
        """The global scale vLLM dequantizes ``item`` with: its own, or for a member of a fused linear the
        largest of the members' (ModelOpt ``weight_scale_2.max()``; compressed-tensors ``1 / max`` of the
        stored divisors), for an expert's up projection the gate's (``share_expert_gate_scales``); vLLM 0.32
        modelopt.py ``KNvfp4Static.process`` and compressed_tensors_w4a4_nvfp4.py
        ``process_weights_after_loading``."""
        members, rule = self.scale_groups.get(item.name, ((item.name,), "max"))
        if rule == "first":
            members = members[:1]
        stored = torch.stack([reader.read(self.weights[m].global_scale).to(torch.float32).reshape(()) for m in members])
        value = stored.max()
        return (1.0 / value).to(torch.float32) if item.fmt == COMPRESSED_TENSORS else value

    def input_global_scale(self, reader: TensorReader, param: str) -> torch.Tensor:
        """vLLM's input global scale of the module of parameter ``param`` (float32 scalar): of a fused linear,
        from the largest of its members' stored values (modelopt.py ``input_scale.max()``, then its
        reciprocal; compressed-tensors ``input_global_scale.max()``)."""
        members, rule = self.scale_groups.get(param, ((param,), "max"))
        if rule != "max":
            members = (param,)
        value = torch.stack([reader.read(self.input_scales[m]).to(torch.float32).reshape(()) for m in members]).max()
        return value if self.fmt == COMPRESSED_TENSORS else (1.0 / value).to(torch.float32)

    def input_scale_value(self, reader: TensorReader, param: str) -> torch.Tensor:
        """The input scale in ModelOpt's sense (amax / 2688): what vLLM's MoE takes the max of."""
        value = reader.read(self.input_scales[param]).to(torch.float32).reshape(())
        return (1.0 / value).to(torch.float32) if self.fmt == COMPRESSED_TENSORS else value


_PER_EXPERT = re.compile(r"^(?P<expert>.*\.experts\.\d+)\.(?P<leaf>[^.]+)\.weight$")
_EXPERTS = re.compile(r"^(?P<experts>.*\.experts)\.(?P<param>gate_up_proj|down_proj)$")


class QuantizedLayerStream(LayerStream):
    """The quantized checkpoint run with the source's architecture: ``module(name)`` gives a module of the
    source's model with the checkpoint's tensors (NVFP4 ones dequantized) and, with ``act_quant``, the inputs
    of its quantized Linears and experts quantize-dequantized."""

    def __init__(
        self,
        checkpoint: QuantizedCheckpoint,
        reader: TensorReader,
        source_config: dict,
        options: EngineOptions,
        act_quant: bool,
    ):
        index = dataclasses.replace(checkpoint.index, config=source_config)
        super().__init__(index, reader, options)
        self.checkpoint, self.act_quant = checkpoint, act_quant
        self.index = checkpoint.index  # its own files (the architecture is the source's)
        checkpoint.share_expert_gate_scales(self.skeleton.family.expert_leaves)

    def _read(self, item, device: torch.device) -> torch.Tensor:
        return self.checkpoint.read(self.reader, item, device)

    def sources(self, name: str) -> list:
        """The checkpoint tensors of module ``name``, checked against the module's shapes (no data read)."""
        meta = self.skeleton.model.get_submodule(name)
        sources = param_sources(self.skeleton, self.index, meta, name, lookup=self.checkpoint.lookup)
        want = meta.state_dict(keep_vars=True)
        for src in sources:
            expected = tuple(want[src.param].shape)
            if src.stacked:
                first = src.tensors[0]
                rows = sum(_shape(t)[0] for t in first)
                shape = (len(src.tensors), rows, *_shape(first[0])[1:])
                bad = [t for parts in src.tensors for t in parts if tuple(_shape(t)[1:]) != tuple(_shape(first[0])[1:])]
                named = bad[0] if bad else first[0]
            else:
                named = src.tensors[0][0]
                shape = _shape(named)
            if tuple(shape) != expected:
                raise CheckpointError(
                    f"--checkpoint {self.index.root}: tensor {_ckpt_name(named)!r} gives {src.param!r} of "
                    f"{name} the shape {list(shape)}, the source's architecture has {list(expected)}"
                )
        return sources

    def has_tensor(self, name: str) -> bool:
        return self.checkpoint.lookup(name) is not None

    @contextlib.contextmanager
    def module(self, name: str) -> Iterator[torch.nn.Module]:
        meta = self.skeleton.model.get_submodule(name)
        live = materialize(meta, self.sources(name), self._read, self.options.device, workers=self.options.read_threads)
        handles = self._attach_act_quant(live, name) if self.act_quant else []
        try:
            yield live
        finally:
            for handle in handles:
                handle.remove()
            for mod in live.modules():
                if hasattr(mod, "_modelopt_streaming_inputs"):
                    del mod._modelopt_streaming_inputs
            live.to_empty(device="meta")

    def _attach_act_quant(self, live: torch.nn.Module, name: str) -> list:
        device = self.options.device
        handles = []
        for sub, mod in live.named_modules():
            path = f"{name}.{sub}" if sub else name
            if isinstance(mod, torch.nn.Linear):
                param = self.skeleton.checkpoint_name(f"{path}.weight")
                if param in self.checkpoint.weights:
                    gs = self.checkpoint.input_global_scale(self.reader, param).to(device)
                    handles.append(mod.register_forward_pre_hook(_quant_input(gs)))
            elif hasattr(mod, "gate_up_proj") and hasattr(mod, "num_experts"):
                gs13, gs2 = self._expert_scales(mod, path)
                mod._modelopt_streaming_inputs = tuple(
                    None if gs is None else functools.partial(fake_quant_nvfp4, global_scale=gs) for gs in (gs13, gs2)
                )
        return handles

    def _expert_scales(self, mod: torch.nn.Module, path: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The experts module's (gate/up, down) input global scales: 1 / max over the experts' input scales."""
        experts = self.skeleton.checkpoint_name(path)
        leaves = self.skeleton.family.expert_leaves
        out = []
        for proj, members in (("gate_up_proj", (0, 1)), ("down_proj", (2,))):
            if leaves is None:
                params = [f"{experts}.{proj}"]
            else:
                params = [f"{experts}.{e}.{leaves[m]}.weight" for e in range(mod.num_experts) for m in members]
            quantized = [p for p in params if p in self.checkpoint.weights]
            if not quantized:
                out.append(None)
                continue
            amax = torch.stack([self.checkpoint.input_scale_value(self.reader, p) for p in quantized]).max()
            out.append((1.0 / amax).to(torch.float32).to(self.options.device))
        return out[0], out[1]


def _shape(item) -> tuple[int, ...]:
    return tuple(item.shape)


def _ckpt_name(item) -> str:
    return item.packed.name if isinstance(item, QuantizedWeight) else item.name


def _quant_input(global_scale: torch.Tensor):
    def hook(_module, args):
        return (fake_quant_nvfp4(args[0], global_scale), *args[1:])

    return hook
