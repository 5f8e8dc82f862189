#!/usr/bin/env python3
"""Write a synthetic DeepSeek-V3-shaped bf16 checkpoint: real tensor names, any size, random weights.

Used by `make demo` (a tiny one) and by the benchmarks (real layer dims, ~5 GB). Names and shapes follow
DeepSeek-V3's checkpoint (checked against transformers' DeepseekV3 in tests/test_synthetic.py); the
weights are random heavy-tailed values, so the checkpoint is for tooling, not for generating text.

    python examples/synthetic_checkpoint.py OUT_DIR --preset tiny
    python examples/synthetic_checkpoint.py OUT_DIR --preset bench --shard_size 1GB
    python examples/synthetic_checkpoint.py OUT_DIR --preset tiny --calib_tokens ROWS.safetensors --calib_shape 16x64

``--calib_tokens`` also writes random token rows (``input_ids`` [N, L]) for ``quantize --calib_data``: the
checkpoint has random weights, so random tokens calibrate it as well as any text would.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass
class DeepseekShape:
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 2
    n_routed_experts: int = 24
    n_shared_experts: int = 1
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    vocab_size: int = 8192
    mtp_layers: int = 0

    def config(self) -> dict:
        cfg = {k: v for k, v in asdict(self).items() if k != "mtp_layers"}
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "torch_dtype": "bfloat16",
            "num_key_value_heads": self.num_attention_heads,
            "num_experts_per_tok": min(8, self.n_routed_experts),
            "n_group": 1,
            "topk_group": 1,
            "num_nextn_predict_layers": self.mtp_layers,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            **cfg,
        }


PRESETS = {
    "tiny": DeepseekShape(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        vocab_size=1024,
        mtp_layers=1,
    ),
    "bench": DeepseekShape(),
}


def tensor_layout(s: DeepseekShape) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the checkpoint, in DeepSeek-V3's naming, with shape and dtype."""
    bf16, f32 = torch.bfloat16, torch.float32
    h = s.hidden_size
    qk_head = s.qk_nope_head_dim + s.qk_rope_head_dim
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "model.embed_tokens.weight": ((s.vocab_size, h), bf16),
        "model.norm.weight": ((h,), bf16),
        "lm_head.weight": ((s.vocab_size, h), bf16),
    }

    def mlp(prefix: str, inter: int) -> None:
        out[f"{prefix}.gate_proj.weight"] = ((inter, h), bf16)
        out[f"{prefix}.up_proj.weight"] = ((inter, h), bf16)
        out[f"{prefix}.down_proj.weight"] = ((h, inter), bf16)

    for i in range(s.num_hidden_layers + s.mtp_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = ((h,), bf16)
        out[f"{p}.post_attention_layernorm.weight"] = ((h,), bf16)
        a = f"{p}.self_attn"
        out[f"{a}.q_a_proj.weight"] = ((s.q_lora_rank, h), bf16)
        out[f"{a}.q_a_layernorm.weight"] = ((s.q_lora_rank,), bf16)
        out[f"{a}.q_b_proj.weight"] = ((s.num_attention_heads * qk_head, s.q_lora_rank), bf16)
        out[f"{a}.kv_a_proj_with_mqa.weight"] = ((s.kv_lora_rank + s.qk_rope_head_dim, h), bf16)
        out[f"{a}.kv_a_layernorm.weight"] = ((s.kv_lora_rank,), bf16)
        out[f"{a}.kv_b_proj.weight"] = (
            (s.num_attention_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank),
            bf16,
        )
        out[f"{a}.o_proj.weight"] = ((h, s.num_attention_heads * s.v_head_dim), bf16)
        if i < s.first_k_dense_replace:
            mlp(f"{p}.mlp", s.intermediate_size)
        else:
            out[f"{p}.mlp.gate.weight"] = ((s.n_routed_experts, h), bf16)
            out[f"{p}.mlp.gate.e_score_correction_bias"] = ((s.n_routed_experts,), f32)
            mlp(f"{p}.mlp.shared_experts", s.moe_intermediate_size * s.n_shared_experts)
            for e in range(s.n_routed_experts):
                mlp(f"{p}.mlp.experts.{e}", s.moe_intermediate_size)
        if i >= s.num_hidden_layers:  # DeepSeek's multi-token-prediction layer
            out[f"{p}.eh_proj.weight"] = ((h, 2 * h), bf16)
            out[f"{p}.enorm.weight"] = ((h,), bf16)
            out[f"{p}.hnorm.weight"] = ((h,), bf16)
            out[f"{p}.shared_head.norm.weight"] = ((h,), bf16)
            out[f"{p}.shared_head.head.weight"] = ((s.vocab_size, h), bf16)
    return out


def random_weight(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """On the generator's device (a CUDA generator draws a 30 GB checkpoint in seconds, not minutes; its
    numbers differ from the CPU generator's), returned on the CPU."""
    dev = g.device
    if len(shape) == 1:
        return (1 + 0.05 * torch.randn(shape, generator=g, device=dev)).to(dtype).cpu()
    w = torch.randn(shape, generator=g, device=dev)
    w *= 0.02
    # Heavy tails: a few outlier columns, as trained LLM weights have.
    w[:, torch.randint(0, shape[1], (max(1, shape[1] // 64),), generator=g, device=dev)] *= 16
    return w.to(dtype).cpu()


def write(
    directory: str | Path, shape: DeepseekShape, shard_size: int = 10**9, seed: int = 0, device: str = "cpu"
) -> Path:
    """Shards of at most ``shard_size`` bytes, in the order DeepSeek's own checkpoint interleaves layers;
    the random numbers drawn on ``device``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = tensor_layout(shape)
    g = torch.Generator(device=device).manual_seed(seed)
    groups: list[list[str]] = [[]]
    size = 0
    for name, (shp, dt) in layout.items():
        nbytes = torch.Size(shp).numel() * (4 if dt == torch.float32 else 2)
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {k: random_weight(*layout[k], g) for k in names}
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
        del tensors
    if n > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (directory / "config.json").write_text(json.dumps(shape.config(), indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--shard_size", default="1GB", help="e.g. 1GB, 5GB, 200MB")
    parser.add_argument("--routed_experts", type=int, help="override the preset's expert count")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (MoE layers are added)")
    parser.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda: much faster)")
    parser.add_argument("--calib_tokens", metavar="FILE", help="also write random calibration rows (input_ids) here")
    parser.add_argument("--calib_shape", default="16x64", help="rows x tokens of --calib_tokens (default 16x64)")
    parser.add_argument("--eval_tokens", metavar="FILE", help="also write other random rows, for evaluate --data")
    args = parser.parse_args()
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    size = args.shard_size.upper()
    shard = int(float(size[:-2]) * units[size[-2:]]) if size[-2:] in units else int(size)
    shape = PRESETS[args.preset]
    if args.routed_experts:
        shape.n_routed_experts = args.routed_experts
    if args.layers:
        shape.num_hidden_layers = args.layers
    out = write(args.output_dir, shape, shard, device=args.device)
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {total / 1e9:.2f} GB in {len(list(out.glob('*.safetensors')))} shard(s)")
    if args.calib_tokens:
        rows, length = (int(x) for x in args.calib_shape.lower().split("x"))
        ids = torch.randint(0, shape.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids}, args.calib_tokens)
        print(f"wrote {args.calib_tokens}: {rows} x {length} calibration tokens")
    if args.eval_tokens:
        rows, length = (int(x) for x in args.calib_shape.lower().split("x"))
        ids = torch.randint(0, shape.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))
        save_file({"input_ids": ids}, args.eval_tokens)
        print(f"wrote {args.eval_tokens}: {rows} x {length} evaluation tokens (not the calibration rows)")


if __name__ == "__main__":
    main()
