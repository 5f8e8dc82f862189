"""Synthetic checkpoints with 3-D fused experts (GPT-OSS), built from transformers' own config class."""

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
