"""More synthetic checkpoints and oracle runs for the tests (GPT-OSS 3-D experts, real configs of other
families, ModelOpt in a given dtype), built from transformers' own config classes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from checkpoints import TINY, make_weights, round_robin, write_checkpoint
from safetensors import safe_open


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


def layout_of_config(config) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict]:
    """Tensor names, shapes (bf16) and config.json exactly as ``save_pretrained`` writes them for a config."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    with tempfile.TemporaryDirectory() as d:
        model.to_empty(device="cpu").to(torch.bfloat16).save_pretrained(d)
        layout = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(f, "pt") as sf:
                for k in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                    layout[k] = (tuple(sf.get_slice(k).get_shape()), torch.bfloat16)
        cfg = json.loads((Path(d) / "config.json").read_text())
    return layout, cfg


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
