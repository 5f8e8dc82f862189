"""The forward pass one piece at a time: the embedding, each decoder layer, the final norm and ``lm_head``,
each materialized on the device from the checkpoint only while it runs, on hidden states carried between
layers. The inputs a layer gets are those transformers' own model forward gives it
(``modeling_*.Model.forward``): position ids ``arange(L)[None]``, position embeddings from the model's rotary
module, the causal mask of ``create_causal_mask`` (and the sliding-window one for the layers
``config.layer_types`` marks), no cache."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from modelopt_streaming.engine import observe
from modelopt_streaming.engine.model import Skeleton, build_skeleton, materialize, param_sources
from modelopt_streaming.source.index import CheckpointIndex, TensorInfo
from modelopt_streaming.source.reader import TensorReader
from modelopt_streaming.source.vendor import DecodedWeight, decoded_weights, read_dtype, read_source


@dataclass
class EngineOptions:
    """How the engine runs a checkpoint.

    device: where each layer runs. dtype: the model's compute dtype (the checkpoint's own, bf16 for every
    family we run). attn_implementation: transformers' attention ("auto": sdpa where the class supports it,
    as from_pretrained picks it; "sdpa"; "eager"). batch_size: sequences per forward call (the same rows
    batched differently give other bits, so a comparison with a reference must batch as it does).
    trust_remote_code: run custom model code. device_budget_bytes: a module larger than this keeps its fused
    experts in host memory and brings each expert to the device when the router picks it (the same
    operations on the same device, so the same bits); None: every module whole on the device. read_threads:
    checkpoint tensors read at once while a module is materialized (each straight to the device)."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.bfloat16
    attn_implementation: str = "auto"
    batch_size: int = 1
    trust_remote_code: bool = False
    device_budget_bytes: int | None = None
    read_threads: int = 1


class LayerStream:
    """One checkpoint run piece by piece. ``layer(i)`` is a context manager giving decoder layer ``i`` on the
    device (its tensors read once), freed on exit; ``forward(layer, i, hidden)`` runs it on a batch."""

    def __init__(self, index: CheckpointIndex, reader: TensorReader, options: EngineOptions):
        self.index, self.reader, self.options = index, reader, options
        self.skeleton: Skeleton = build_skeleton(
            index.config,
            str(index.root),
            dtype=options.dtype,
            attn_implementation=options.attn_implementation,
            trust_remote_code=options.trust_remote_code,
        )
        config = self.skeleton.config
        # The masks are those of the implementation we call through to: a copy of the config keeps its name,
        # while the modules (which share ``config``) dispatch to our observed functions.
        self._mask_config = type(config).from_dict(config.to_dict())
        self._mask_config._attn_implementation = self.skeleton.attn_implementation
        config._attn_implementation = observe.register(self.skeleton.attn_implementation)
        config._experts_implementation = observe.EXPERTS_IMPLEMENTATION
        device = options.device
        rotary_class = type(self.skeleton.decoder.rotary_emb)
        # Computed on the CPU and moved, as from_pretrained's weight initialization computes inv_freq
        # (modeling_utils ``_init_weights``: ``rope_fn(module.config)`` without a device, then copied in): the
        # same frequencies computed on a GPU can differ in the last bit.
        self.rotary = rotary_class(config=config).to(device)
        self._cache: dict[int, tuple] = {}

    @functools.cached_property
    def decoded(self) -> dict[str, DecodedWeight]:
        """The source's vendor encodings (FP8 blocks, INT4 packs, MXFP4), read as bf16: found on first use, so a
        stream over a checkpoint with its own lookup (an NVFP4 one, ``engine.quantized``) never looks."""
        return decoded_weights(self.index)

    @property
    def num_layers(self) -> int:
        return self.skeleton.num_layers

    def _read(self, info: TensorInfo | DecodedWeight, device: torch.device) -> torch.Tensor:
        """One source tensor on ``device``: to a GPU through the reader's page-locked pieces (a pageable copy of
        a whole tensor runs at a fraction of the link's speed)."""
        return read_source(self.reader, info, device=device if device.type == "cuda" else None)

    @contextlib.contextmanager
    def module(self, name: str) -> Iterator[torch.nn.Module]:
        """The module ``name`` of the model (e.g. ``model.layers.3``) with its tensors, on the device."""
        meta = self.skeleton.model.get_submodule(name)
        sources = param_sources(self.skeleton, self.index, meta, name, self.decoded)
        on_host = self._experts_on_host(meta, sources)
        live = materialize(meta, sources, self._read, self.options.device, on_host, self.options.read_threads)
        fetching = []
        if on_host:
            # The experts stay in host memory and each one the router picks comes to the device for its turn
            # (observe.experts_forward): GPU memory holds the rest of the layer and one expert.
            for sub in live.modules():
                if hasattr(sub, "gate_up_proj") and hasattr(sub, "num_experts"):
                    sub._modelopt_streaming_fetch = self.options.device
                    fetching.append(sub)
        try:
            yield live
        finally:
            for sub in fetching:
                del sub._modelopt_streaming_fetch
            # Back to meta: the layer's tensors are freed, the skeleton keeps its structure.
            live.to_empty(device="meta")

    def _experts_on_host(self, meta: torch.nn.Module, sources: list) -> frozenset[str]:
        """The fused experts' parameters of a module larger than the device budget, kept in host memory."""
        budget = self.options.device_budget_bytes
        if budget is None:
            return frozenset()
        size = sum(t.numel() * t.element_size() for t in meta.state_dict(keep_vars=True).values())
        return frozenset(s.param for s in sources if s.stacked) if size > budget else frozenset()

    def live_views(self, name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of module ``name`` (materialized as ``module``) that its live parameters hold
        exactly as read from the source, by checkpoint tensor name: each parameter whose dtype is the one its
        source is read in (bf16 for a decoded vendor encoding), and each expert's gate, up and down as views
        of the fused 3-D experts. A tensor cast on loading (an fp32 source in a bf16 model) is left out: its
        bytes are not the source's."""
        params = module.state_dict(keep_vars=True)
        out = {}
        for src in param_sources(self.skeleton, self.index, module, name, self.decoded):
            live = params[src.param]
            if not src.stacked:
                (info,) = src.tensors[0]
                if read_dtype(info) == live.dtype:
                    out[info.name] = live.detach()
                continue
            for e, parts in enumerate(src.tensors):
                row = 0
                for info in parts:
                    rows = info.shape[0]
                    if read_dtype(info) == live.dtype:
                        out[info.name] = live.detach()[e, row : row + rows]
                    row += rows
        return out

    def checkpoint_name(self, module_path: str) -> str:
        return self.skeleton.checkpoint_name(module_path)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self.module("model.embed_tokens") as embed:
            return embed(input_ids.to(self.options.device))

    def _inputs(self, hidden: torch.Tensor) -> tuple:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        key = (tuple(hidden.shape), hidden.device)
        if key not in self._cache:
            self._cache.clear()
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            kwargs = dict(
                config=self._mask_config,
                inputs_embeds=hidden,
                attention_mask=None,
                past_key_values=None,
                position_ids=position_ids,
            )
            masks = {"full_attention": create_causal_mask(**kwargs)}
            if "sliding_attention" in (getattr(self.skeleton.config, "layer_types", None) or ()):
                masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
            self._cache[key] = (position_ids, masks, self.rotary(hidden, position_ids))
        return self._cache[key]

    def forward(self, layer: torch.nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index`` on a batch of hidden states [B, L, H]."""
        position_ids, masks, position_embeddings = self._inputs(hidden)
        types = getattr(self.skeleton.config, "layer_types", None)
        mask = masks[types[index]] if types else masks["full_attention"]
        with torch.no_grad():
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                past_key_values=None,
                use_cache=False,
            )
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and ``lm_head`` (tied to the embedding when the checkpoint has no lm_head of its own)."""
        with self.module("model.norm") as norm, torch.no_grad():
            normed = norm(hidden)
        head = "lm_head" if self.skeleton.checkpoint_name("lm_head.weight") in self.index.tensors else None
        with self.module(head or "model.embed_tokens") as mod, torch.no_grad():
            weight = mod.weight
            return torch.nn.functional.linear(normed, weight)
