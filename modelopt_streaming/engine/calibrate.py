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

from modelopt_streaming.engine import observe
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
            _run_layer(stream, layer_index, current, nxt, result, kv, batch, on_live)
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
) -> None:
    """One layer over every row, its statistics folded into ``result`` (each module belongs to one layer, so
    ``result`` is complete for the layers done), then ``on_live`` while the layer is still on the device."""
    path = f"model.layers.{layer_index}"
    device = stream.options.device
    amax = observe.Amax()
    kv_max: dict[str, list[torch.Tensor]] = {}
    with stream.module(path) as layer:
        handles = observe.observe_linears(layer, lambda p: stream.checkpoint_name(f"{path}.{p}"), amax)
        experts = _attach_expert_observers(stream, layer, path)
        attentions = _attach_kv_observers(stream, layer, path, kv_max) if kv else []
        try:
            for i in range(0, inputs.count, batch):
                outputs[i : i + batch] = stream.forward(layer, layer_index, inputs.load(slice(i, i + batch), device))
        finally:
            for handle in handles:
                handle.remove()
            for mod, _ in experts:
                del mod._modelopt_streaming_observer
            for mod in attentions:
                del mod._modelopt_streaming_kv
        result.input_amax.update(amax.as_floats())
        for _mod, (name, obs, leaves) in experts:
            _spread_expert_values(result, name, obs, leaves)
        result.kv_amax.update({k: (float(a), float(b)) for k, (a, b) in kv_max.items()})
        if on_live is not None:
            on_live(path, stream.live_views(path, layer), result)


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
