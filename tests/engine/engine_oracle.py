"""Shared by the engine tests: tiny checkpoints of every family the engine runs, and transformers' full model of
the same files as the reference computation."""

from __future__ import annotations

from pathlib import Path

import torch
from checkpoints import checkpoint_layout, make_weights, round_robin, write_checkpoint
from checkpoints_extra import make_gpt_oss_checkpoint

ARCHS = ("llama", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")


def make_source(directory: Path, arch: str, seed: int = 0) -> Path:
    """A tiny checkpoint of ``arch`` with random heavy-tailed weights, tensors spread over 3 shards."""
    if arch == "gpt_oss":
        return make_gpt_oss_checkpoint(directory, seed=seed)
    layout, cfg = checkpoint_layout(arch)
    return write_checkpoint(directory, make_weights(layout, seed=seed), cfg, assign=round_robin(3))


def reference_model(directory: Path):
    """transformers' full model of the checkpoint as ModelOpt calibrates it: bf16, the default (sdpa) attention,
    experts on the eager per-expert path."""
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16, experts_implementation="eager"
    ).eval()


def token_rows(vocab: int, rows: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
