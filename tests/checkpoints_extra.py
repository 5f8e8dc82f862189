"""More synthetic checkpoints and oracle runs for the tests (GPT-OSS 3-D experts, real configs of other
families, ModelOpt in a given dtype), built from transformers' own config classes."""

from __future__ import annotations

from pathlib import Path

import torch
from checkpoints import TINY, layout_of_config, make_weights, round_robin, write_checkpoint


def tiny_gpt_oss_config():
    """GPT-OSS with 3-D fused experts: ``mlp.experts.gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]."""
    import transformers as tf

    return tf.GptOssConfig(
        intermediate_size=32,
        num_hidden_layers=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=32,
        **TINY,
    )


def make_gpt_oss_checkpoint(directory: Path, n_shards: int = 3, seed: int = 0) -> Path:
    layout, cfg = layout_of_config(tiny_gpt_oss_config())
    return write_checkpoint(directory, make_weights(layout, seed), cfg, round_robin(n_shards))


def make_config_checkpoint(
    directory: Path, config, n_shards: int = 2, seed: int = 0, dtype: torch.dtype | None = None
) -> Path:
    layout, cfg = layout_of_config(config)
    return write_checkpoint(directory, make_weights(layout, seed, dtype), cfg, round_robin(n_shards))


def modelopt_export_in(src: Path, out: Path, dtype: torch.dtype) -> Path:
    """NVIDIA ModelOpt's own flow on the CPU with the model loaded and exported in ``dtype`` (fp16, fp32),
    as a user quantizing an fp16 or fp32 checkpoint with ModelOpt would run it."""
    import modelopt.torch.quantization as mtq
    import transformers as tf
    from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    vocab = model.config.vocab_size

    def calibrate(m):
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            m(torch.randint(0, vocab, (2, 16), generator=g))

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, calibrate)
    export_hf_checkpoint(model, dtype=dtype, export_dir=out)
    return out


def tiny_llama4_config():
    """Llama-4's text model: 3-D fused experts ``feed_forward.experts.gate_up_proj`` [E, H, 2I] and
    ``down_proj`` [E, I, H], a shared expert and ``feed_forward.router``; every layer MoE."""
    import transformers as tf

    return tf.Llama4TextConfig(
        intermediate_size=32,
        intermediate_size_mlp=128,
        num_hidden_layers=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        moe_layers=[0, 1],
        no_rope_layers=[1, 1],
        attention_chunk_size=64,
        **TINY,
    )


def make_fused_experts_checkpoint(directory: Path, family: str, n_shards: int = 3, seed: int = 0) -> Path:
    """A tiny checkpoint of a family with 3-D fused experts: "gpt_oss" or "llama4"."""
    config = {"gpt_oss": tiny_gpt_oss_config, "llama4": tiny_llama4_config}[family]()
    layout, cfg = layout_of_config(config)
    return write_checkpoint(directory, make_weights(layout, seed), cfg, round_robin(n_shards))


def deepseek_fp8_checkpoint(directory: Path, seed: int = 5) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny DeepSeek-V3 as DeepSeek publishes it: every Linear but routers, lm_head and embeddings in
    128x128 block FP8 (``weight`` float8_e4m3fn + ``weight_scale_inv`` float32). Returns the directory and
    each FP8 weight's value by DeepSeek's own formula (fp8_cast_bf16.py: ``weight.float() * scale_inv``
    per block, then bf16)."""
    from checkpoints import checkpoint_layout

    layout, cfg = checkpoint_layout("deepseek_v3")
    tensors, expected = {}, {}
    for name, w in make_weights(layout, seed).items():
        fp8_linear = (
            name.endswith(".weight")
            and w.dim() == 2
            and not any(s in name for s in ("embed_tokens", "lm_head", "shared_head.head"))
            and not name.endswith("mlp.gate.weight")
        )
        if not fp8_linear:
            tensors[name] = w
            continue
        rows, cols = w.shape
        br, bc = -(-rows // 128), -(-cols // 128)
        padded = torch.zeros(br * 128, bc * 128)
        padded[:rows, :cols] = w.float()
        blocks = padded.reshape(br, 128, bc, 128)
        scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        q = (blocks / scale_inv[:, None, :, None]).reshape(br * 128, bc * 128)[:rows, :cols].to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = q, scale_inv
        full = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        expected[name] = (q.float() * full).to(torch.bfloat16)
    cfg = dict(cfg, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    return write_checkpoint(directory, tensors, cfg, round_robin(3)), expected


def kimi_int4_checkpoint(directory: Path, seed: int = 9) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Kimi-K2-Thinking-style checkpoint (DeepSeek-V3 names) whose routed experts are compressed-tensors
    pack-quantized INT4, packed by that library itself. Returns the directory and each expert weight as the
    library's own decompressor gives it (bf16)."""
    from checkpoints import checkpoint_layout
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True, dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    layout, cfg = checkpoint_layout("deepseek_v3")
    tensors, expected = {}, {}
    for name, w in make_weights(layout, seed).items():
        if ".mlp.experts." not in name or not name.endswith(".weight"):
            tensors[name] = w
            continue
        module = name[: -len(".weight")]
        groups = w.float().reshape(w.shape[0], -1, 32)
        scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale.to(torch.bfloat16)}, scheme)
        tensors.update({f"{module}.{k}": v for k, v in packed.items()})
        expected[name] = PackedQuantizationCompressor.decompress(packed, scheme)["weight"].to(torch.bfloat16)
    cfg = dict(
        cfg,
        quantization_config={
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 4, "type": "int", "group_size": 32, "symmetric": True, "strategy": "group"},
                }
            },
        },
    )
    return write_checkpoint(directory, tensors, cfg, round_robin(3)), expected


def calibrated_modelopt_export(src: Path, out: Path, batches: int = 3) -> Path:
    """NVIDIA ModelOpt's own flow on the CPU with activation calibration: mtq.quantize (NVFP4_DEFAULT_CFG)
    with a few random batches through its forward_loop, then export_hf_checkpoint: every input_scale is the
    calibrated activation amax / 2688."""
    import modelopt.torch.quantization as mtq
    import transformers as tf
    from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size

    def calibrate(m):
        g = torch.Generator().manual_seed(1)
        for _ in range(batches):
            m(torch.randint(0, vocab, (2, 24), generator=g))

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, calibrate)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    return out
