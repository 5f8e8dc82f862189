"""The Hessians GPTQ needs, ``XᵀX`` of each quantized Linear's inputs, accumulated in float32 on the device while
a decoder layer runs (the factor 2 of the paper's ``2XᵀX`` and any division by the token count change no code:
``codec.gptq`` damps relative to the mean diagonal).

- ``nn.Linear``: forward pre-hooks. Modules fed the same input tensor in one call (q/k/v, gate/up, DeepSeek's
  q_a/kv_a: the plan's fused groups) share one Hessian when the caller gives them one key; a member that was fed
  another input is an error, not a silently wrong Hessian.
- Fused 3-D experts: each expert's gate/up Hessian from the tokens the router sent it, and its down Hessian from
  those tokens' ``act(gate) * up``, through the experts loop the engine already runs (``observe.experts_forward``).
  A layer's experts may not fit the device together (DeepSeek-V3: 256 x 7168² x 4 bytes = 52 GB for gate/up
  alone), so an observer accumulates a chosen set of experts and the caller runs the layer once per set
  (``expert_groups``).

Each batch is added as ``H += xᵀx`` in the order the rows run, so the same rows batched alike give the same bits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch

__all__ = [
    "ExpertHessians",
    "HessianSum",
    "LinearHessians",
    "attach_expert_hessians",
    "detach_expert_hessians",
    "expert_groups",
    "is_fused_experts",
]


class HessianSum:
    """Sum of ``xᵀx`` over every token a module saw (float32, on the device of the first input) and the count."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        x = x.float()
        # Two steps, not addmm: a BLAS may fold the accumulator into the product's partial sums, and a reference
        # that computes xᵀx and adds it (as the tests do) would then differ in the last bits.
        product = x.T @ x
        if self.h is None:
            self.h = product
        else:
            self.h += product
        self.tokens += x.shape[0]

    def nbytes(self) -> int:
        return 0 if self.h is None else self.h.numel() * 4


class LinearHessians:
    """Forward pre-hooks on the ``nn.Linear`` modules of a layer whose key (``key_of(checkpoint name)``) is not
    None: the modules of one key share one ``HessianSum``, added to once per input tensor they are fed."""

    def __init__(self, key_of: Callable[[str], str | None]) -> None:
        self.key_of = key_of
        self.sums: dict[str, HessianSum] = {}
        self._members: dict[str, dict[str, int]] = {}  # key -> module -> tokens it was fed
        self._last: dict[str, weakref.ref] = {}  # key -> the input tensor last added

    def attach(self, layer: torch.nn.Module, name_of: Callable[[str], str]) -> list:
        """Hooks on ``layer``'s Linears (``name_of(path)``: a module path's checkpoint name); remove them after."""
        handles = []
        for path, mod in layer.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            name = name_of(path)
            key = self.key_of(name)
            if key is None:
                continue
            self._members.setdefault(key, {})[name] = 0
            handles.append(mod.register_forward_pre_hook(lambda _m, args, n=name, k=key: self._add(n, k, args[0])))
        return handles

    def _add(self, name: str, key: str, x: torch.Tensor) -> None:
        tokens = x.numel() // x.shape[-1] if x.dim() else 0
        self._members[key][name] += tokens
        last = self._last.get(key)
        if last is not None and last() is x:
            return  # another member of the group, fed the same tensor
        self.sums.setdefault(key, HessianSum()).add(x)
        self._last[key] = weakref.ref(x)

    def check(self) -> None:
        """Every member of a key was fed exactly the tokens its Hessian holds (the same tensors).

        Raises:
            ValueError: a group whose members were fed different inputs (their Hessian would be wrong).
        """
        for key, members in self._members.items():
            held = self.sums[key].tokens if key in self.sums else 0
            for name, tokens in members.items():
                if tokens != held:
                    raise ValueError(
                        f"{name} shares the Hessian {key!r} but was fed {tokens} tokens of its own input against "
                        f"{held} in the Hessian: the group's members do not share their input"
                    )


class ExpertHessians:
    """Per-expert Hessians of one fused experts module, for the experts of ``selected``: gate/up from the tokens
    the router sent each expert, down from those tokens' ``act(gate) * up``. Attached as the module's
    ``_modelopt_streaming_hessian`` while its layer runs (``observe.experts_forward`` calls ``add``)."""

    def __init__(self, num_experts: int, selected: Iterable[int] | None = None) -> None:
        self.selected = frozenset(range(num_experts) if selected is None else selected)
        self.gate_up: dict[int, HessianSum] = {}
        self.down: dict[int, HessianSum] = {}

    def add(self, expert: int, gate_up_input: torch.Tensor, down_input: torch.Tensor) -> None:
        if expert not in self.selected:
            return
        self.gate_up.setdefault(expert, HessianSum()).add(gate_up_input)
        self.down.setdefault(expert, HessianSum()).add(down_input)

    def tokens(self, expert: int) -> int:
        return self.gate_up[expert].tokens if expert in self.gate_up else 0


def is_fused_experts(module: torch.nn.Module) -> bool:
    """transformers' fused 3-D experts (``gate_up_proj``, ``down_proj``, ``num_experts``), as the engine runs them."""
    return hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and hasattr(module, "num_experts")


def attach_expert_hessians(
    layer: torch.nn.Module, name_of: Callable[[str], str], selected: Iterable[int] | None = None
) -> dict[str, ExpertHessians]:
    """An ``ExpertHessians`` for ``selected`` experts (None: all) on every fused experts module of ``layer``, by
    checkpoint name; ``detach_expert_hessians`` removes them."""
    out = {}
    for path, mod in layer.named_modules():
        if is_fused_experts(mod):
            mod._modelopt_streaming_hessian = out[name_of(path)] = ExpertHessians(mod.num_experts, selected)
    return out


def detach_expert_hessians(layer: torch.nn.Module) -> None:
    for mod in layer.modules():
        if hasattr(mod, "_modelopt_streaming_hessian"):
            del mod._modelopt_streaming_hessian


def expert_groups(num_experts: int, bytes_per_expert: int, budget_bytes: int | None) -> list[range]:
    """Consecutive runs of experts whose Hessians fit ``budget_bytes`` together (at least one expert a run);
    ``None``: all at once."""
    if budget_bytes is None or bytes_per_expert * num_experts <= budget_bytes:
        return [range(num_experts)]
    per = max(1, budget_bytes // max(1, bytes_per_expert))
    return [range(s, min(num_experts, s + per)) for s in range(0, num_experts, per)]
