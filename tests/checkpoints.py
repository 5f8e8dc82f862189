"""Synthetic checkpoints for the tests: real tensor names from transformers config classes, random
heavy-tailed weights, and shard layouts chosen by the test (fused partners split across shards)."""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=128, num_hidden_layers=2, **TINY)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            **TINY,
        )
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            **TINY,
        )
    if arch == "mixtral":
        return tf.MixtralConfig(
            intermediate_size=64, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, **TINY
        )
    if arch in ("deepseek_v3", "kimi_k2"):
        return tf.DeepseekV3Config(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=256,
            max_position_embeddings=128,
        )
    raise ValueError(arch)


def layout_of_config(config) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict]:
    """Tensor names, shapes and dtypes exactly as ``save_pretrained`` writes them for a config, plus config.json."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    with tempfile.TemporaryDirectory() as d:
        model.to_empty(device="cpu").to(torch.bfloat16).save_pretrained(d)
        layout = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(f, "pt") as sf:
                for k in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                    # DeepSeek-V3 ships its router bias in float32, as the model keeps it.
                    dt = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
                    layout[k] = (tuple(sf.get_slice(k).get_shape()), dt)
        cfg = json.loads((Path(d) / "config.json").read_text())
    return layout, cfg


@functools.cache
def checkpoint_layout(arch: str) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict]:
    """The layout of the tiny model of ``arch`` (see ``layout_of_config``), DeepSeek/Kimi with their MTP layer."""
    layout, cfg = layout_of_config(tiny_config(arch))
    if arch in ("deepseek_v3", "kimi_k2"):
        # A multi-token-prediction layer past num_hidden_layers, as DeepSeek-V3 ships it.
        n = cfg["num_hidden_layers"]
        for k, v in list(layout.items()):
            if k.startswith(f"model.layers.{n - 1}."):
                layout[k.replace(f"layers.{n - 1}.", f"layers.{n}.")] = v
        h, vocab = cfg["hidden_size"], cfg["vocab_size"]
        layout[f"model.layers.{n}.eh_proj.weight"] = ((h, 2 * h), torch.bfloat16)
        layout[f"model.layers.{n}.enorm.weight"] = ((h,), torch.bfloat16)
        layout[f"model.layers.{n}.hnorm.weight"] = ((h,), torch.bfloat16)
        layout[f"model.layers.{n}.shared_head.head.weight"] = ((vocab, h), torch.bfloat16)
    if arch == "kimi_k2":
        # Kimi-K2.5 nests the language model and prefixes every name.
        layout = {f"language_model.{k}": v for k, v in layout.items()}
        cfg = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25", "text_config": cfg}
    return layout, cfg


def heavy_tailed(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Student-t-like weights with outlier rows/columns, a few all-zero blocks and exact zeros."""
    if len(shape) < 2:
        return (1 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
    scale = torch.exp(torch.randn(shape, generator=generator) * 0.8)
    w = torch.randn(shape, generator=generator) * scale * 0.02
    rows, cols = shape[-2], shape[-1]
    w[..., torch.randint(0, rows, (max(1, rows // 16),), generator=generator), :] *= 8
    w[..., :, torch.randint(0, cols, (max(1, cols // 32),), generator=generator)] *= 20
    if cols >= 32:
        w[..., 0, :16] = 0.0  # an all-zero block
    return w.to(dtype)


def make_weights(layout: dict, seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: heavy_tailed(shape, dtype or dt, g) for k, (shape, dt) in sorted(layout.items())}


def round_robin(n_shards: int) -> Callable[[list[str]], list[int]]:
    """Tensor i of the sorted names goes to shard i % n: neighbours (gate/up, q/k/v) land apart."""
    return lambda names: [i % n_shards for i in range(len(names))]


def write_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    assign: Callable[[list[str]], list[int]] | None = None,
    extra_files: dict | None = None,
) -> Path:
    """Save with the safetensors library (independent of our writer), sharded by ``assign``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shard_ids = assign(names) if assign else [0] * len(names)
    n = max(shard_ids) + 1
    if n == 1:
        save_file(
            {k: tensors[k].contiguous() for k in names}, str(directory / "model.safetensors"), metadata={"format": "pt"}
        )
    else:
        weight_map, total = {}, 0
        for s in range(n):
            fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            part = {k: tensors[k].contiguous() for k, i in zip(names, shard_ids) if i == s}
            save_file(part, str(directory / fname), metadata={"format": "pt"})
            for k, t in part.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def make_model_checkpoint(
    directory: Path, arch: str, n_shards: int = 3, seed: int = 0, dtype: torch.dtype | None = None
) -> Path:
    layout, cfg = checkpoint_layout(arch)
    return write_checkpoint(directory, make_weights(layout, seed, dtype), cfg, round_robin(n_shards))


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                out[k] = sf.get_tensor(k)
    return out


def modelopt_export(src: Path, out: Path) -> Path:
    """NVIDIA ModelOpt's own flow on the CPU: load, mtq.quantize (NVFP4_DEFAULT_CFG), export_hf_checkpoint."""
    import modelopt.torch.quantization as mtq
    import transformers as tf
    from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size

    def calibrate(m):
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            m(torch.randint(0, vocab, (2, 16), generator=g))

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, calibrate)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    return out


def weights_match_modelopt(ref_dir: Path, ours_dir: Path) -> int:
    """Every tensor of ModelOpt's export equals ours byte for byte, input_scale aside (ModelOpt's is
    calibrated, ours the uncalibrated 1.0); returns how many weight_scale_2 were compared."""
    ref, ours = load_dir(ref_dir), load_dir(ours_dir)
    compared = 0
    for name, t in ref.items():
        if name.endswith("input_scale"):
            continue
        a, b = t, ours[name]
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), name
        compared += name.endswith("weight_scale_2")
    return compared


def compressed_tensors_nvfp4a16(src: Path, out: Path, skip=("lm_head", "embed_tokens", "mlp.gate.")) -> Path:
    """A compressed-tensors NVFP4A16 checkpoint made with that library's own compressor, every Linear
    quantized on its own global scale: what llm-compressor's model-free path writes for fused partners."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = QuantizationArgs(
        num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True, dynamic=False
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors = load_dir(src)
    config = json.loads((src / "config.json").read_text())
    n_layers = config["num_hidden_layers"]
    out_tensors, ignore = {}, []
    for name, w in tensors.items():
        module = name[: -len(".weight")]
        mtp = f"layers.{n_layers}." in name
        if not name.endswith(".weight") or w.dim() != 2 or mtp or any(s in name for s in skip):
            out_tensors[name] = w
            if name.endswith(".weight") and w.dim() == 2 and "embed_tokens" not in name:
                ignore.append(module)
            continue
        g = generate_gparam(w.float().min(), w.float().max())
        blocks = w.float().reshape(w.shape[0], -1, 16)
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=g)
        sd = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": g}, scheme)
        for k, v in sd.items():
            out_tensors[f"{module}.{k}"] = v
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "ignore": sorted(ignore),
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "weights": {
                    "num_bits": 4,
                    "type": "float",
                    "strategy": "tensor_group",
                    "symmetric": True,
                    "dynamic": False,
                    "group_size": 16,
                },
            }
        },
    }
    return write_checkpoint(out, out_tensors, config, round_robin(2))


def rewrite_tensor(directory: Path, name: str, value: torch.Tensor | None, beside: str | None = None) -> None:
    """Replace (or with None, delete) one tensor in whichever shard holds it (or holds ``beside``, to add
    it there), keeping the index as it is."""
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            keys = list(sf.keys())
            if (beside or name) not in keys:
                continue
            data = {k: sf.get_tensor(k) for k in keys}
        if value is None:
            del data[name]
        else:
            data[name] = value
        save_file(data, str(f), metadata={"format": "pt"})
        return
    raise KeyError(name)


def tied_llama_checkpoint(directory: Path, seed: int = 0, embed_scale: float = 0.5, linear_scale: float = 2.0) -> Path:
    """A tiny dense Llama with ``tie_word_embeddings: true`` (no ``lm_head`` tensor, as ``save_pretrained``
    writes a tied model) that vLLM's CPU engine can run: head_dim 32, the smallest head size of vLLM's CPU
    attention backend (vllm/v1/attention/backends/cpu_attn.py, ``get_supported_head_sizes``).

    Weights are heavy-tailed like trained ones. ``heavy_tailed`` draws them at the 0.02 scale of an
    initialised model, whose next-token distribution is nearly flat; the embedding (also the output head)
    and the Linear weights are scaled up so that logits spread over several units (greedy steps with clear
    top-1 margins exist) and the layers, not only the embedding, decide the tokens (W4A4 and bf16 decode
    differently)."""
    import transformers as tf

    config = tf.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as d:
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        model.tie_weights()  # to_empty gives lm_head storage of its own; tied again, as a loaded model is
        model.save_pretrained(d)
        layout = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(f, "pt") as sf:
                for k in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                    layout[k] = (tuple(sf.get_slice(k).get_shape()), torch.bfloat16)
        cfg = json.loads((Path(d) / "config.json").read_text())
    assert "lm_head.weight" not in layout, "a tied model must not write lm_head"
    tensors = make_weights(layout, seed)
    for name, w in tensors.items():
        if w.dim() == 2:
            scale = embed_scale if name == "model.embed_tokens.weight" else linear_scale
            tensors[name] = (w.float() * scale).to(torch.bfloat16)
    return write_checkpoint(directory, tensors, cfg, round_robin(2))


def make_tied_checkpoint(directory: Path, arch: str, n_shards: int = 2, seed: int = 0) -> Path:
    """``tie_word_embeddings: true`` and no lm_head tensor, as ``save_pretrained`` writes a tied model."""
    layout, cfg = checkpoint_layout(arch)
    layout = {k: v for k, v in layout.items() if not k.startswith("lm_head.")}
    tied = dict(cfg, tie_word_embeddings=True)
    return write_checkpoint(directory, make_weights(layout, seed), tied, round_robin(n_shards))


def make_llama4_checkpoint(directory: Path, n_shards: int = 2, seed: int = 0) -> Path:
    """A tiny Llama-4 (Llama4ForConditionalGeneration, as the Hub ships it): a dense layer, a MoE layer with
    3-D fused experts (``feed_forward.experts.gate_up_proj`` [E, H, 2I]) and a shared expert, a vision
    model and its projector, names exactly as ``save_pretrained`` writes them."""
    import transformers as tf

    text = dict(
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        max_position_embeddings=128,
        no_rope_layers=[1, 1],
        attention_chunk_size=64,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
        vision_output_dim=64,
        projector_input_dim=64,
        projector_output_dim=64,
    )
    config = tf.Llama4Config(text_config=text, vision_config=vision)
    with torch.device("meta"):
        model = tf.Llama4ForConditionalGeneration(config)
    with tempfile.TemporaryDirectory() as d:
        model.to_empty(device="cpu").to(torch.bfloat16).save_pretrained(d)
        layout = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(f, "pt") as sf:
                for k in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                    layout[k] = (tuple(sf.get_slice(k).get_shape()), torch.bfloat16)
        cfg = json.loads((Path(d) / "config.json").read_text())
    return write_checkpoint(directory, make_weights(layout, seed), cfg, round_robin(n_shards))


def make_kimi_k25_checkpoint(directory: Path, n_shards: int = 2, seed: int = 0) -> Path:
    """Kimi-K2.5 as published: the DeepSeek-V3 language model under ``language_model.``, a MoonViT vision
    tower (``vision_tower.encoder.blocks.N.{wqkv,wo,mlp.fc0,mlp.fc1}``) and the ``mm_projector.proj.{0,2}``
    projector, with a one-block ``vision_config`` in config.json (Kimi_K25VisionConfig's fields)."""
    layout, cfg = checkpoint_layout("kimi_k2")
    h, v = 64, 64
    bf16 = torch.bfloat16
    vision = {
        "vision_tower.patch_embed.proj.weight": ((v, 3, 14, 14), bf16),
        "vision_tower.patch_embed.proj.bias": ((v,), bf16),
        "vision_tower.patch_embed.pos_emb.weight": ((64, 64, v), bf16),
        "vision_tower.encoder.blocks.0.norm0.weight": ((v,), bf16),
        "vision_tower.encoder.blocks.0.norm0.bias": ((v,), bf16),
        "vision_tower.encoder.blocks.0.wqkv.weight": ((3 * v, v), bf16),
        "vision_tower.encoder.blocks.0.wqkv.bias": ((3 * v,), bf16),
        "vision_tower.encoder.blocks.0.wo.weight": ((v, v), bf16),
        "vision_tower.encoder.blocks.0.wo.bias": ((v,), bf16),
        "vision_tower.encoder.blocks.0.norm1.weight": ((v,), bf16),
        "vision_tower.encoder.blocks.0.norm1.bias": ((v,), bf16),
        "vision_tower.encoder.blocks.0.mlp.fc0.weight": ((2 * v, v), bf16),
        "vision_tower.encoder.blocks.0.mlp.fc0.bias": ((2 * v,), bf16),
        "vision_tower.encoder.blocks.0.mlp.fc1.weight": ((v, 2 * v), bf16),
        "vision_tower.encoder.blocks.0.mlp.fc1.bias": ((v,), bf16),
        "vision_tower.encoder.final_layernorm.weight": ((v,), bf16),
        "vision_tower.encoder.final_layernorm.bias": ((v,), bf16),
        "mm_projector.pre_norm.weight": ((v,), bf16),
        "mm_projector.pre_norm.bias": ((v,), bf16),
        "mm_projector.proj.0.weight": ((4 * v, 4 * v), bf16),
        "mm_projector.proj.0.bias": ((4 * v,), bf16),
        "mm_projector.proj.2.weight": ((h, 4 * v), bf16),
        "mm_projector.proj.2.bias": ((h,), bf16),
    }
    cfg = dict(
        cfg,
        vision_config={
            "patch_size": 14,
            "num_attention_heads": 4,
            "num_hidden_layers": 1,
            "hidden_size": v,
            "intermediate_size": 2 * v,
            "mm_hidden_size": v,
            "text_hidden_size": h,
        },
        tie_word_embeddings=False,
    )
    return write_checkpoint(directory, make_weights({**layout, **vision}, seed), cfg, round_robin(n_shards))
