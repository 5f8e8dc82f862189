"""What the engine observes while a layer runs, through the places transformers opens for it.

- Linear inputs: forward pre-hooks on every ``nn.Linear`` of the layer (max |x| over every token it sees,
  as ModelOpt's max calibration of the unquantized model keeps it).
- Experts: transformers dispatches fused experts by name (``integrations/moe.py`` ``ExpertsInterface``,
  ``config._experts_implementation``); ours keeps the per-expert loop of the eager implementation (the same
  operations in the same order, so the outputs are the eager bits, which the tests check against the full
  model) and sees the MoE block input of every token (the gate/up input ModelOpt's shared expert quantizer
  sees), each routed token's ``act(gate) * up`` (the down input) and how many tokens each expert received; for
  GPTQ, each expert's own inputs (``engine.hessian.ExpertHessians``).
- Keys and values: attention functions are dispatched by name too (``AttentionInterface``); ours records
  max |k| and max |v| where they enter the attention function (after RoPE and k-norm, before KV heads are
  repeated, as ModelOpt measures them) and calls the real implementation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

EXPERTS_IMPLEMENTATION = "modelopt_streaming"
ATTENTION_PREFIX = "modelopt_streaming:"


class Amax:
    """Running max |x| per name, in float32 (a bf16 max is exact in float32), kept on the device until read."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def update(self, name: str, x: torch.Tensor) -> None:
        a = x.detach().abs().amax().float() if x.numel() else None
        if a is None:
            return
        old = self.values.get(name)
        self.values[name] = a if old is None else torch.maximum(old, a)

    def as_floats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.values.items()}


class ExpertObserver:
    """Attached to one experts module (``module._modelopt_streaming_observer``) while its layer runs: the
    shared max |input| of gate/up and of down, and the tokens each expert received."""

    def __init__(self, num_experts: int) -> None:
        self.amax = Amax()
        self.tokens = torch.zeros(num_experts, dtype=torch.int64)

    def block_input(self, x: torch.Tensor) -> None:
        self.amax.update("gate_up", x)

    def expert_input(self, expert: int, n_tokens: int) -> None:
        self.tokens[expert] += n_tokens

    def down_input(self, h: torch.Tensor) -> None:
        self.amax.update("down", h)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The eager per-expert loop of transformers' fused experts (``modeling_deepseek_v3.DeepseekV3Experts.forward``
    and its copies; GPT-OSS's transposed, biased layout through the flags ``use_experts_implementation`` sets),
    observed. The gate is applied by the module's own ``_apply_gate`` (transformers' default one is the same
    ``chunk``, ``act_fn(gate) * up`` the eager code inlines)."""
    observer: ExpertObserver | None = getattr(self, "_modelopt_streaming_observer", None)
    hessians = getattr(self, "_modelopt_streaming_hessian", None)  # engine.hessian.ExpertHessians (GPTQ)
    # (gate/up input, down input) transforms: evaluate's NVFP4 quantize-dequantize of a W4A4 checkpoint's
    # expert inputs (engine.quantized), applied to each expert's tokens where vLLM's MoE quantizes them.
    quant_in, quant_mid = getattr(self, "_modelopt_streaming_inputs", (None, None))
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    if observer is not None:
        observer.block_input(hidden_states)
    transposed, bias = getattr(self, "is_transposed", False), getattr(self, "has_bias", False)
    fetch = getattr(self, "_modelopt_streaming_fetch", None)  # experts in host memory: one at a time
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        if quant_in is not None:
            current_state = quant_in(current_state)
        if fetch is not None:
            e = int(expert_idx)
            gate_up_w, down_w = self.gate_up_proj[e].to(fetch), self.down_proj[e].to(fetch)
        else:
            gate_up_w, down_w = self.gate_up_proj[expert_idx], self.down_proj[expert_idx]
        gate_up = current_state @ gate_up_w if transposed else F.linear(current_state, gate_up_w)
        if bias:
            gate_up = gate_up + self.gate_up_proj_bias[expert_idx]
        current_hidden_states = self._apply_gate(gate_up)
        if observer is not None:
            observer.expert_input(int(expert_idx), token_idx.numel())
            observer.down_input(current_hidden_states)
        if hessians is not None:
            hessians.add(int(expert_idx), current_state, current_hidden_states)
        if quant_mid is not None:
            current_hidden_states = quant_mid(current_hidden_states)
        if transposed:
            current_hidden_states = current_hidden_states @ down_w
        else:
            current_hidden_states = F.linear(current_hidden_states, down_w)
        if bias:
            current_hidden_states = current_hidden_states + self.down_proj_bias[expert_idx]
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def _attention(inner: str) -> Callable:
    def forward(module, query, key, value, attention_mask, **kwargs):
        observe = getattr(module, "_modelopt_streaming_kv", None)
        if observe is not None:
            observe(key, value)
        return _inner_attention(module, inner)(module, query, key, value, attention_mask, **kwargs)

    return forward


def _inner_attention(module: torch.nn.Module, inner: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager":  # each modeling file has its own eager function, the default of its dispatch
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def register(inner_attention: str) -> str:
    """Register our experts and attention functions with transformers; returns the attention name to set."""
    from transformers.integrations.moe import ExpertsInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
    name = ATTENTION_PREFIX + inner_attention
    AttentionInterface.register(name, _attention(inner_attention))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner_attention])
    return name


def observe_linears(layer: torch.nn.Module, name_of: Callable[[str], str], amax: Amax) -> list:
    """Forward pre-hooks recording max |input| of every ``nn.Linear`` of ``layer`` under ``name_of(path)``."""
    handles = []
    for path, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            key = name_of(path)
            handles.append(mod.register_forward_pre_hook(lambda _m, args, key=key: amax.update(key, args[0])))
    return handles
