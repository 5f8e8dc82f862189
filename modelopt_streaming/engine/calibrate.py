"""Max calibration, one decoder layer at a time: the statistics ModelOpt's ``mtq.quantize`` with max
calibration keeps for the unquantized model in its own dtype (../shared/engine.md), by checkpoint module name.

- every ``nn.Linear``: max |x| over every token of its input;
- fused experts: one value per projection shared by the layer's experts (gate/up: the whole MoE block input;
  down: every routed token's ``act(gate) * up``), written for every expert, those that saw no token too;
- with ``kv=True``, each attention layer's max |k| and max |v| where they enter the attention function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modelopt_streaming.engine import hessian, observe
from modelopt_streaming.engine.hidden import HiddenStore, default_host_budget
from modelopt_streaming.engine.runner import EngineOptions, LayerStream
from modelopt_streaming.source.index import CheckpointIndex
from modelopt_streaming.source.reader import TensorReader


@dataclass
class Calibration:
    """What one calibration pass measured, by checkpoint module name.

    input_amax: module -> max |input| (experts: one entry per expert module, the shared value);
    kv_amax: attention module (``...self_attn``) -> (max |k|, max |v|); expert_tokens: experts module ->
    tokens routed to each expert; tokens: tokens run through the model."""

    input_amax: dict[str, float] = field(default_factory=dict)
    kv_amax: dict[str, tuple[float, float]] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    tokens: int = 0

    def as_json(self) -> dict:
        return {
            "input_amax": self.input_amax,
            "kv_amax": {k: list(v) for k, v in self.kv_amax.items()},
            "expert_tokens": self.expert_tokens,
            "tokens": self.tokens,
        }

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        """Python floats print and parse back exactly, so a kept calibration is the one measured."""
        kv = {k: (float(a), float(b)) for k, (a, b) in data["kv_amax"].items()}
        return cls(dict(data["input_amax"]), kv, dict(data["expert_tokens"]), int(data["tokens"]))

    def experts_without_tokens(self) -> dict[str, list[int]]:
        return {m: [e for e, n in enumerate(t) if n == 0] for m, t in self.expert_tokens.items() if 0 in t}


@dataclass
class WeightSolver:
    """A weight quantization that needs each layer's Hessians (GPTQ), run inside the calibration pass.

    key_of: checkpoint name of an ``nn.Linear`` -> the key of its Hessian (the members of a fused group share
    one), or None for a Linear not quantized (a router).
    solve: ``solve(layer_path, views, linears, experts, calibration)``, called while the layer is on the device
    with its live tensors (``LayerStream.live_views``), the statistics so far (the layer's included) and
    Hessians: ``linears`` (key -> ``HessianSum``) once,
    ``experts`` (experts module -> ``ExpertHessians``) once per group of experts; it quantizes what they cover
    and writes the dequantized weights back into ``views`` in place. The experts come first, group by group
    (each expert's inputs depend only on the layer's input and its own weights, so replacing the weights of
    one group changes no other group's Hessians), the Linears last.
    expert_budget_bytes: device memory for one group of experts' Hessians (None: on a GPU, its free memory once
    the layer is there less ``SOLVE_RESERVE_BYTES``; on the CPU, all experts at once).
    sequential: the next layer's inputs are this layer's outputs with its quantized weights (the layer runs
    once more); otherwise those of the unquantized layer."""

    key_of: Callable[[str], str | None]
    solve: Callable[[str, dict[str, torch.Tensor], dict, dict, Calibration], None]
    expert_budget_bytes: int | None = None
    sequential: bool = True


@dataclass
class Boundary:
    """Where a calibration pass stands between two layers: the layers done, what they measured, and the
    hidden states of every row entering the next layer (what a resumed pass starts from)."""

    layers_done: int
    calibration: Calibration
    hidden: HiddenStore


def calibrate(
    index: CheckpointIndex,
    reader: TensorReader,
    input_ids: torch.Tensor,
    options: EngineOptions,
    kv: bool = False,
    on_layer: Callable[[Boundary, int], None] | None = None,
    resume: Boundary | None = None,
    host_budget_bytes: int | None = None,
    on_live: Callable[[str, dict[str, torch.Tensor], Calibration], None] | None = None,
    solver: WeightSolver | None = None,
) -> Calibration:
    """Run ``input_ids`` [N, L] through the checkpoint layer by layer and return the statistics.

    Args:
        index, reader: the source checkpoint.
        input_ids: the calibration rows, each used as given.
        options: device, dtype, attention implementation, batch size.
        kv: also measure keys and values.
        on_layer: called after each layer with the boundary reached and the number of layers (a job keeps
            the boundary to resume from; the store is valid until the call returns).
        resume: a boundary kept by an earlier pass over the same rows: the pass continues after its layers.
        on_live: called while a module is still on the device, after it ran on every row and its statistics
            are in the calibration (the embedding, then each decoder layer), with the checkpoint tensors its
            parameters hold as read (``LayerStream.live_views``): a job quantizes and writes them there, so
            the source is read once.
        host_budget_bytes: bytes of hidden states kept in host memory by each of the pass's two stores (a layer's
            input and output), a memory-mapped file beyond; None: ``default_host_budget()``.
        solver: a quantization that needs the layers' Hessians (GPTQ), run on each layer before ``on_live``.

    Raises:
        UsageError: an architecture the engine does not run.
        CheckpointError: a tensor the model needs is missing or has another shape.
    """
    stream = LayerStream(index, reader, options)
    n, length = input_ids.shape
    shape = (length, stream.skeleton.config.hidden_size)
    batch = max(1, options.batch_size)
    budget = default_host_budget() if host_budget_bytes is None else host_budget_bytes

    def new_store() -> HiddenStore:
        return HiddenStore(n, shape, options.dtype, budget, device=options.device)

    if resume is not None:
        result, current, first = resume.calibration, resume.hidden, resume.layers_done
    else:
        result, first = Calibration(tokens=n * length), 0
        current = new_store()
        with stream.module("model.embed_tokens") as embed, torch.no_grad():
            for i in range(0, n, batch):
                current[i : i + batch] = embed(input_ids[i : i + batch].to(options.device))
            if on_live is not None:
                on_live("model.embed_tokens", stream.live_views("model.embed_tokens", embed), result)
    # Two stores for the whole pass, a layer's input and its output, swapped at each boundary: page-locked
    # host memory is slow to allocate, and a fresh store's first writes fault every page in.
    spare: HiddenStore | None = None
    try:
        for layer_index in range(first, stream.num_layers):
            nxt = spare if spare is not None else new_store()
            spare = None
            _run_layer(stream, layer_index, current, nxt, result, kv, batch, on_live, solver)
            if current.owned:
                spare = current
            else:
                current.close()
            current = nxt
            if on_layer is not None:
                on_layer(Boundary(layer_index + 1, result, current), stream.num_layers)
    finally:
        current.close()
        if spare is not None:
            spare.close()
    return result


def _run_layer(
    stream: LayerStream,
    layer_index: int,
    inputs: HiddenStore,
    outputs: HiddenStore,
    result: Calibration,
    kv: bool,
    batch: int,
    on_live: Callable[[str, dict[str, torch.Tensor], Calibration], None] | None = None,
    solver: WeightSolver | None = None,
) -> None:
    """One layer over every row, its statistics folded into ``result`` (each module belongs to one layer, so
    ``result`` is complete for the layers done), then ``on_live`` while the layer is still on the device.
    With ``solver``, the same forward accumulates the Hessians, the solver quantizes the layer in place, and
    (sequential) the layer runs again to give the next layer's inputs."""
    path = f"model.layers.{layer_index}"
    name_of = lambda p: stream.checkpoint_name(f"{path}.{p}")  # noqa: E731
    amax = observe.Amax()
    kv_max: dict[str, list[torch.Tensor]] = {}
    with stream.module(path) as layer:
        handles = observe.observe_linears(layer, name_of, amax)
        experts = _attach_expert_observers(stream, layer, path)
        attentions = _attach_kv_observers(stream, layer, path, kv_max) if kv else []
        groups: list = [None]
        if solver is not None:
            linear_hessians = hessian.LinearHessians(solver.key_of)
            handles += linear_hessians.attach(layer, name_of)
            groups = _expert_groups(layer, _hessian_budget(solver.expert_budget_bytes, stream.options.device))
            expert_hessians = hessian.attach_expert_hessians(layer, name_of, groups[0])
        keep = solver is None or not solver.sequential
        try:
            _forward_rows(stream, layer, layer_index, inputs, outputs if keep else None, batch)
        finally:
            for handle in handles:
                handle.remove()
            for mod, _ in experts:
                del mod._modelopt_streaming_observer
            for mod in attentions:
                del mod._modelopt_streaming_kv
            hessian.detach_expert_hessians(layer)
        result.input_amax.update(amax.as_floats())
        for _mod, (name, obs, leaves) in experts:
            _spread_expert_values(result, name, obs, leaves)
        result.kv_amax.update({k: (float(a), float(b)) for k, (a, b) in kv_max.items()})
        views = stream.live_views(path, layer)
        if solver is not None:
            linear_hessians.check()
            solver.solve(path, views, {}, expert_hessians, result)
            del expert_hessians
            for group in groups[1:]:
                expert_hessians = hessian.attach_expert_hessians(layer, name_of, group)
                try:
                    _forward_rows(stream, layer, layer_index, inputs, None, batch)
                finally:
                    hessian.detach_expert_hessians(layer)
                solver.solve(path, views, {}, expert_hessians, result)
                del expert_hessians
            solver.solve(path, views, linear_hessians.sums, {}, result)
            del linear_hessians
            if solver.sequential:
                _forward_rows(stream, layer, layer_index, inputs, outputs, batch)
        if on_live is not None:
            on_live(path, views, result)


def _forward_rows(
    stream: LayerStream,
    layer: torch.nn.Module,
    index: int,
    inputs: HiddenStore,
    outputs: HiddenStore | None,
    batch: int,
) -> None:
    """The layer over every row, batch by batch as given; the outputs kept in ``outputs`` unless None."""
    device = stream.options.device
    for i in range(0, inputs.count, batch):
        out = stream.forward(layer, index, inputs.load(slice(i, i + batch), device))
        if outputs is not None:
            outputs[i : i + batch] = out


# Device memory left beside a group of experts' Hessians: a batch's activations and one GPTQ solve (a 7168-input
# weight's float32 copy, Hessian and factor: ~0.5 GB; DeepSeek-V3's dense down_proj, 18432 inputs: ~3 GB).
SOLVE_RESERVE_BYTES = 8 * 1024**3


def _hessian_budget(asked: int | None, device: torch.device) -> int | None:
    """The bytes a group of experts' Hessians may take: as asked, else on a GPU what is free now (the layer is
    there) less the reserve. The grouping changes no bits (each expert's Hessian is the same in any group)."""
    if asked is not None or device.type != "cuda":
        return asked
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, free - SOLVE_RESERVE_BYTES)


def _expert_groups(layer: torch.nn.Module, budget: int | None) -> list:
    """The groups of experts whose Hessians the device holds at once (``hessian.expert_groups``), the same for
    every fused experts module of the layer (a layer has one); ``[None]`` (all) for a layer without experts."""
    sizes = [
        (mod.num_experts, 4 * (_input_width(mod.gate_up_proj, mod) ** 2 + _input_width(mod.down_proj, mod) ** 2))
        for mod in layer.modules()
        if hessian.is_fused_experts(mod)
    ]
    if not sizes:
        return [None]
    n, per_expert = sizes[0][0], sum(b for _, b in sizes)
    return hessian.expert_groups(n, per_expert, budget)


def _input_width(weight: torch.Tensor, mod: torch.nn.Module) -> int:
    """The input width of a fused experts projection: [E, out, in], or [E, in, out] in GPT-OSS's layout."""
    return weight.shape[1] if getattr(mod, "is_transposed", False) else weight.shape[2]


def _attach_expert_observers(stream: LayerStream, layer: torch.nn.Module, path: str) -> list:
    """An observer on every fused experts module of the layer; their values are spread over the checkpoint's
    expert modules once the layer has run."""
    out = []
    for sub, mod in layer.named_modules():
        if not (hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and hasattr(mod, "num_experts")):
            continue
        name = stream.checkpoint_name(f"{path}.{sub}")
        obs = observe.ExpertObserver(mod.num_experts)
        mod._modelopt_streaming_observer = obs
        out.append((mod, (name, obs, stream.skeleton.family.expert_leaves)))
    return out


def _spread_expert_values(result: Calibration, name: str, obs: observe.ExpertObserver, leaves) -> None:
    """The experts module's shared values under every checkpoint module they belong to."""
    values = obs.amax.as_floats()
    gate_up, down = values.get("gate_up"), values.get("down")
    result.expert_tokens[name] = obs.tokens.tolist()
    if leaves is None:  # 3-D experts in the checkpoint: one tensor per projection
        targets = [(f"{name}.gate_up_proj", gate_up), (f"{name}.down_proj", down)]
    else:
        gate, up, dn = leaves
        n = len(result.expert_tokens[name])
        targets = [(f"{name}.{e}.{leaf}", gate_up) for e in range(n) for leaf in (gate, up)]
        targets += [(f"{name}.{e}.{dn}", down) for e in range(n)]
    for module, value in targets:
        if value is not None:
            result.input_amax[module] = value


def _attach_kv_observers(stream: LayerStream, layer: torch.nn.Module, path: str, kv_max: dict) -> list:
    out = []
    for sub, mod in layer.named_modules():
        if not hasattr(mod, "layer_idx") or not any(isinstance(c, torch.nn.Linear) for c in mod.children()):
            continue
        if not sub.endswith(("self_attn", "attn", "attention")):
            continue
        name = stream.checkpoint_name(f"{path}.{sub}")

        def record(k: torch.Tensor, v: torch.Tensor, name: str = name) -> None:
            ka, va = k.detach().abs().amax().float(), v.detach().abs().amax().float()
            old = kv_max.get(name)
            kv_max[name] = [ka, va] if old is None else [torch.maximum(old[0], ka), torch.maximum(old[1], va)]

        mod._modelopt_streaming_kv = record
        out.append(mod)
    return out
