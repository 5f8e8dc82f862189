"""Default exclusions against real model classes: the oracle is the transformers model itself (its input and
output embeddings, every nn.Embedding, its router modules), never our own name lists."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
import transformers as tf
from checkpoints import TINY, layout_of_config, load_dir, write_checkpoint
from checkpoints_extra import make_config_checkpoint

from modelopt_streaming.plan.build import Recipe, build_plan
from modelopt_streaming.source.index import build_index

T = dict(hidden_size=64, num_attention_heads=4, vocab_size=256, max_position_embeddings=128)


def _configs():
    return {
        "gpt_neox": tf.GPTNeoXConfig(intermediate_size=128, num_hidden_layers=2, **T),
        "opt": tf.OPTConfig(ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64, tie_word_embeddings=False, **T),
        "dbrx": tf.DbrxConfig(
            d_model=64,
            n_heads=4,
            n_layers=2,
            max_seq_len=128,
            vocab_size=256,
            ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
        ),
        "granitemoe": tf.GraniteMoeConfig(
            intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, **TINY
        ),
    }


def _model_facts(config) -> tuple[set[str], set[str], set[str]]:
    """(embedding modules, the output projection, router Linears) as the model class defines them, by the
    names ``save_pretrained`` gives them on disk (transformers 5 renames some modules in memory)."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    embeddings = {m for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    embeddings.add(model.get_input_embeddings())
    head = {model.get_output_embeddings()}
    # A router holds its own weight (transformers 5's GraniteMoeTopKRouter) or wraps a Linear (DbrxRouter).
    routers = {
        c
        for m in model.modules()
        if type(m).__name__.endswith(("Router", "TopKGating"))
        for c in [m, *m.children()]
        if isinstance(getattr(c, "weight", None), torch.nn.Parameter) and c.weight.dim() == 2
    }
    marks = {}
    with torch.no_grad():
        for i, m in enumerate(embeddings | head | routers):
            m.weight.fill_(1000.0 + i)  # a value no initialised weight holds: finds the module's tensor on disk
            marks[m] = 1000.0 + i
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        on_disk = load_dir(Path(d))
    where = {
        m: {k[: -len(".weight")] for k, t in on_disk.items() if t.dim() == 2 and bool((t == v).all())}
        for m, v in marks.items()
    }
    assert all(len(names) == 1 for names in where.values()), where

    def disk(modules):
        return {next(iter(where[m])) for m in modules}

    return disk(embeddings), disk(head), disk(routers)


@pytest.mark.parametrize("family", sorted(_configs()))
def test_embeddings_heads_and_routers_of_real_classes(family, tmp_path):
    config = _configs()[family]
    embeddings, head, routers = _model_facts(config)
    plan = build_plan(build_index(make_config_checkpoint(tmp_path / "src", config)), Recipe())
    assert embeddings and head
    for module in embeddings:
        assert plan.unquantized.get(module) == "embedding", module
    for module in head:
        assert plan.unquantized.get(module) == "lm_head", module
    assert (family in ("dbrx", "granitemoe")) == bool(routers)
    for module in routers:
        assert plan.unquantized.get(module) == "MoE router", module
    # What is left unquantized by name is exactly those: every other 2-D Linear weight is quantized.
    by_name = {m for m, why in plan.unquantized.items() if why in ("embedding", "lm_head", "MoE router")}
    assert by_name == embeddings | head | routers
    assert plan.quantized


def test_gpt_neox_names():
    embeddings, head, _ = _model_facts(_configs()["gpt_neox"])
    assert head == {"embed_out"} and "gpt_neox.embed_in" in embeddings


def test_opt_learned_positions_are_an_embedding():
    embeddings, _, _ = _model_facts(_configs()["opt"])
    assert "model.decoder.embed_positions" in embeddings


def test_mimo_mtp_layers_stay_unquantized(tmp_path):
    """MiMo keeps its multi-token-prediction layers in ``model.mtp_layers.N`` (vLLM's mimo.py drops that prefix
    from the main model, mimo_mtp.py builds them apart); names as vLLM's mimo_mtp.py defines the layer."""
    layout, cfg = layout_of_config(tf.Qwen2Config(intermediate_size=128, num_hidden_layers=2, **TINY))
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=g).to(torch.bfloat16) for k, (shape, _) in layout.items()}
    h = cfg["hidden_size"]
    for k in list(tensors):
        if k.startswith("model.layers.0."):
            tensors[k.replace("model.layers.0.", "model.mtp_layers.0.")] = tensors[k].clone()
    tensors["model.mtp_layers.0.input_proj.weight"] = torch.randn(h, 2 * h, generator=g).to(torch.bfloat16)
    tensors["model.mtp_layers.0.token_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    cfg.update(architectures=["MiMoForCausalLM"], model_type="mimo", num_nextn_predict_layers=1)
    src = write_checkpoint(tmp_path / "src", tensors, cfg)
    plan = build_plan(build_index(src), Recipe())
    mtp = {m for m in plan.linear_modules if ".mtp_layers." in m}
    assert len(mtp) == 8  # q, k, v, o, gate, up, down, input_proj
    assert all(plan.unquantized[m] == "MTP layer" for m in mtp)
    assert "model.layers.0.self_attn.q_proj" in plan.quantized
    assert json.loads((src / "config.json").read_text())["architectures"] == ["MiMoForCausalLM"]


def test_dbrx_experts_without_weight_names_are_listed_not_dropped(tmp_path):
    """DBRX stores each MoE layer's experts as 2-D ``ffn.experts.mlp.{w1,v1,w2}`` (no ``.weight``): not
    quantized, but reported by name like every unquantized Linear rather than silently copied."""
    src = make_config_checkpoint(tmp_path / "src", _configs()["dbrx"])
    plan = build_plan(build_index(src), Recipe())
    for layer in (0, 1):
        for leaf in ("w1", "v1", "w2"):
            module = f"transformer.blocks.{layer}.ffn.experts.mlp.{leaf}"
            assert plan.unquantized[module].startswith("not a Linear weight"), module
            assert module in plan.linear_modules
    assert plan.quantized  # attention is still quantized
