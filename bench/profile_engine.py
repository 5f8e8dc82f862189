#!/usr/bin/env python3
"""Where the engine's time goes on one decoder layer: the engine's layer forward (with and without its
observers) against transformers' own model built by ``from_pretrained`` on the same device, the same layer on
the same batch, plus the host<->device copies of one batch of hidden states and a torch.profiler table.

    python3 bench/profile_engine.py --src CKPT --device cuda --batch 8 --seq_len 2048

Prints one JSON line (and the profiler tables on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(torch, fn, reps: int) -> float:
    fn()
    _sync(torch)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(torch)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", default="0,last", help="layer indices to time ('last': the last decoder layer)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from modelopt_streaming.engine import observe
    from modelopt_streaming.engine.calibrate import _attach_expert_observers
    from modelopt_streaming.engine.runner import EngineOptions, LayerStream
    from modelopt_streaming.source.index import build_index
    from modelopt_streaming.source.reader import TensorReader

    device = torch.device(args.device)
    out: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "seq_len": args.seq_len,
    }
    t0 = time.perf_counter()
    index = build_index(Path(args.src))
    reader = TensorReader(args.src)
    stream = LayerStream(index, reader, EngineOptions(device=device, batch_size=args.batch))
    out["stream_setup_s"] = time.perf_counter() - t0
    out["attn_implementation"] = stream.skeleton.attn_implementation
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(
        args.batch, args.seq_len, stream.skeleton.config.hidden_size, device=device, dtype=torch.bfloat16, generator=g
    )
    position_ids, masks, _ = stream._inputs(hidden)
    mask = masks["full_attention"]
    out["mask"] = None if mask is None else [str(mask.dtype), list(mask.shape)]

    host = hidden.cpu()
    pinned = host.pin_memory() if device.type == "cuda" else host
    out["copy_ms"] = {
        "d2h_pageable": 1e3 * _timed(torch, lambda: hidden.cpu(), args.reps),
        "h2d_pageable": 1e3 * _timed(torch, lambda: host.to(device), args.reps),
        "h2d_pinned": 1e3 * _timed(torch, lambda: pinned.to(device, non_blocking=True), args.reps),
        "d2h_pinned": 1e3 * _timed(torch, lambda: pinned.copy_(hidden, non_blocking=True), args.reps),
        "batch_mb": hidden.numel() * 2 / 2**20,
    }

    n_layers = stream.num_layers
    picks = [n_layers - 1 if x == "last" else int(x) for x in args.layers.split(",")]
    out["layers"] = {}
    for li in dict.fromkeys(picks):
        entry: dict = {}
        t0 = time.perf_counter()
        with stream.module(f"model.layers.{li}") as layer:
            _sync(torch)
            entry["materialize_s"] = time.perf_counter() - t0
            entry["plain_ms"] = 1e3 * _timed(
                torch, lambda layer=layer, li=li: stream.forward(layer, li, hidden), args.reps
            )
            amax = observe.Amax()
            handles = observe.observe_linears(layer, lambda p: p, amax)
            experts = _attach_expert_observers(stream, layer, f"model.layers.{li}")
            entry["observed_ms"] = 1e3 * _timed(
                torch, lambda layer=layer, li=li: stream.forward(layer, li, hidden), args.reps
            )
            with profile(
                activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            ) as prof:
                stream.forward(layer, li, hidden)
                _sync(torch)
            for h in handles:
                h.remove()
            for mod, _ in experts:
                del mod._modelopt_streaming_observer
            # transformers' own dispatch: the config the modules share, back to sdpa and eager experts
            cfg = stream.skeleton.config
            saved = cfg._attn_implementation, cfg._experts_implementation
            cfg._attn_implementation, cfg._experts_implementation = stream.skeleton.attn_implementation, "eager"
            try:
                entry["transformers_dispatch_ms"] = 1e3 * _timed(
                    torch, lambda layer=layer, li=li: stream.forward(layer, li, hidden), args.reps
                )
                entry["transformers_dispatch_mask_none_ms"] = 1e3 * _timed(
                    torch,
                    lambda layer=layer: layer(
                        hidden,
                        attention_mask=None,
                        position_ids=position_ids,
                        position_embeddings=stream._inputs(hidden)[2],
                        use_cache=False,
                    ),
                    args.reps,
                )
            finally:
                cfg._attn_implementation, cfg._experts_implementation = saved
        print(f"=== layer {li} by CUDA time", file=sys.stderr)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), file=sys.stderr)
        print(f"=== layer {li} by CPU time", file=sys.stderr)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), file=sys.stderr)
        entry["profile_top_cuda"] = [
            [e.key, round(e.device_time_total / 1e3, 2), e.count]
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
        ]
        out["layers"][li] = entry
        print(json.dumps({li: entry}), file=sys.stderr, flush=True)

    # transformers' own model, as ModelOpt calibrates it: the whole decoder layer called by the model
    import transformers

    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.bfloat16).to(device)
    out["from_pretrained_s"] = time.perf_counter() - t0
    out["hf_attn_implementation"] = model.config._attn_implementation
    out["hf_experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device, generator=g)
    with torch.no_grad():
        out["hf_full_forward_ms"] = 1e3 * _timed(torch, lambda: model.model(ids, use_cache=False), args.reps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
