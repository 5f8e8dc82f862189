"""vLLM itself is the oracle: for every layer vLLM builds from our output, its quantization decision agrees
with our tensors.

Each checkpoint below is quantized by us, then ``vllm_oracle/asked_layers.py`` runs under vLLM's own
interpreter (its virtual environment, see conftest.py; one process for the whole session, see
vllm_oracle/client.py): it builds the model class from our config.json as ``vllm serve`` does, on the meta
device, and records every prefix the model asks its quantization config about with the method vLLM's
ModelOptNvFp4Config chose (NVFP4 linear, NVFP4 MoE, unquantized, or a refusal to load). The test then
reads our tensors independently of our code: a layer is NVFP4 in the files iff every weight that vLLM
loads into it (found by vLLM's own name mapping and the class's packed_modules_mapping, both reported by
the oracle) has its ``weight_scale``.

Earlier outputs of this tool (exclude lists without ``lm_head`` for a tied embedding, or without the fused
name of a partly excluded group) are included to show that the oracle sees the failure, and that our
``validate`` names the same layer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from checkpoints import (
    TINY,
    layout_of_config,
    make_kimi_k25_checkpoint,
    make_llama4_checkpoint,
    make_model_checkpoint,
    make_tied_checkpoint,
    make_weights,
    round_robin,
    write_checkpoint,
)
from checkpoints_extra import make_gpt_oss_checkpoint
from vllm_oracle.client import oracle, tensor_decisions, tensor_names, vllm_decisions

from modelopt_streaming import quantize
from modelopt_streaming.consumers import VllmExclusion, consumer_layers, family_of
from modelopt_streaming.errors import PartlyExcludedFusedLayer
from modelopt_streaming.validate import validate

_EXPERTS_3D = re.compile(r"\.experts\.(?:gate_up_proj|down_proj)$")  # 3-D fused experts: no ".weight"

# Scopes and partial exclusions of the acceptance: one member of q/k/v, one of q_a/kv_a, one expert, one
# whole layer. Each family gets the ones its names have.
QKV = ("exclude_k_proj", {"exclude": ["*.k_proj"]})
MLA = ("exclude_q_a_proj", {"exclude": ["*.q_a_proj"]})
LAYER = ("exclude_layer_1", {"exclude": ["*.layers.1.*"]})
SCOPES = [("default", {}), ("mlp_only", {"mlp_only": True}), ("experts_only", {"experts_only": True})]
VARIANTS = {
    "llama": [*SCOPES, QKV, LAYER],
    "qwen3_moe": [*SCOPES, QKV, ("exclude_expert", {"exclude": ["*.layers.1.mlp.experts.2.*"]}), LAYER],
    "qwen2_moe": [*SCOPES, QKV, ("exclude_expert", {"exclude": ["*.layers.1.mlp.experts.2.*"]}), LAYER],
    "mixtral": [*SCOPES, QKV, ("exclude_expert", {"exclude": ["*.layers.0.block_sparse_moe.experts.1.w2"]}), LAYER],
    "deepseek_v3": [*SCOPES, MLA, ("exclude_expert", {"exclude": ["*.layers.2.mlp.experts.3.*"]}), LAYER],
    # Kimi-K2.5: the language model under "language_model.", a vision tower and projector.
    "kimi_k25": [*SCOPES, MLA, ("exclude_expert", {"exclude": ["*.layers.2.mlp.experts.3.*"]}), LAYER],
    # GPT-OSS keeps each MoE layer's experts in two 3-D tensors: "one expert" is one of them.
    "gpt_oss": [*SCOPES, QKV, ("exclude_expert", {"exclude": ["*.layers.1.mlp.experts.down_proj"]}), LAYER],
    "llama4": [*SCOPES, QKV, ("exclude_expert", {"exclude": ["*.layers.1.feed_forward.experts.down_proj"]}), LAYER],
    # Dense classes that share Llama's rules in the consumer table.
    "qwen2": [("default", {}), QKV, LAYER],
    "qwen3": [("default", {}), QKV, LAYER],
    "mistral": [("default", {}), QKV],
    # Config-dependent packed_modules_mapping: a dense layer in Qwen3-MoE (mlp_only_layers) adds gate_up_proj;
    # DeepSeek-V2-Lite (no q_lora_rank) has a lone q_proj and no fused_qkv_a_proj.
    "qwen3_moe_mlp_only_layers": [("default", {}), ("exclude_up_proj", {"exclude": ["*.layers.0.mlp.up_proj"]})],
    "deepseek_v2_lite": [("default", {}), ("mlp_only", {"mlp_only": True}), LAYER],
}
DENSE_CONFIGS = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}
MOE_CONFIGS = {
    "qwen3_moe_mlp_only_layers": lambda tf: tf.Qwen3MoeConfig(
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        **TINY,
    ),
    "deepseek_v2_lite": lambda tf: tf.DeepseekV2Config(
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
        **{**TINY, "num_key_value_heads": 4},
    ),
}


def config_checkpoint(directory: Path, arch: str) -> Path:
    import transformers as tf

    layout, cfg = layout_of_config(MOE_CONFIGS[arch](tf))
    cfg.setdefault("architectures", [type(tf.AutoModelForCausalLM.from_config(MOE_CONFIGS[arch](tf))).__name__])
    return write_checkpoint(directory, make_weights(layout), cfg, round_robin(2))


# vLLM's Llama-4 class imports torchvision, absent from its environment: its oracle runs beside a stand-in.
NEEDS_TORCHVISION_STUB = ("llama4/",)
# Classes that tie lm_head to the embedding when the config says so (and still ask about lm_head).
TIED = ["llama", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2", "qwen3"]


def dense_checkpoint(directory: Path, arch: str, tied: bool = False) -> Path:
    """A tiny Qwen2 / Qwen3 / Mistral from transformers' config class (tied: no lm_head tensor)."""
    import transformers as tf

    config = getattr(tf, DENSE_CONFIGS[arch])(
        intermediate_size=128, num_hidden_layers=2, head_dim=16, tie_word_embeddings=tied, **TINY
    )
    layout, cfg = layout_of_config(config)
    if tied:
        layout = {k: v for k, v in layout.items() if not k.startswith("lm_head.")}
    return write_checkpoint(directory, make_weights(layout), dict(cfg, tie_word_embeddings=tied), round_robin(2))


def rewrite_exclusions(directory: Path, edit) -> None:
    """Replace the exclude list in both files vLLM may read (an earlier output of this tool)."""
    hf = json.loads((directory / "hf_quant_config.json").read_text())
    hf["quantization"]["exclude_modules"] = edit(hf["quantization"]["exclude_modules"])
    (directory / "hf_quant_config.json").write_text(json.dumps(hf))
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = hf["quantization"]["exclude_modules"]
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("consumer")
    quiet = dict(progress="none")
    out: dict[str, Path] = {}
    for arch, variants in VARIANTS.items():
        src = base / f"{arch}-src"
        if arch == "gpt_oss":
            make_gpt_oss_checkpoint(src, n_shards=2)
        elif arch == "llama4":
            make_llama4_checkpoint(src)
        elif arch == "kimi_k25":
            make_kimi_k25_checkpoint(src)
        elif arch in DENSE_CONFIGS:
            dense_checkpoint(src, arch)
        elif arch in MOE_CONFIGS:
            config_checkpoint(src, arch)
        else:
            make_model_checkpoint(src, arch, n_shards=2)
        for name, kwargs in variants:
            out[f"{arch}/{name}"] = base / f"{arch}-{name}"
            quantize(src, out[f"{arch}/{name}"], **kwargs, **quiet)
    for arch in TIED:
        tied_src = base / f"{arch}-tied-src"
        if arch in DENSE_CONFIGS:
            src = dense_checkpoint(tied_src, arch, tied=True)
        else:
            src = make_tied_checkpoint(tied_src, arch)
        out[f"{arch}/tied"] = base / f"{arch}-tied"
        quantize(src, out[f"{arch}/tied"], **quiet)
    # A list naming the projector by its checkpoint names: vLLM renames them (mm_projector.proj.0 -> linear_1).
    exact = base / "kimi_k25-projector_exact"
    shutil.copytree(out["kimi_k25/default"], exact)
    projector = ["mm_projector.proj.0", "mm_projector.proj.2"]
    rewrite_exclusions(exact, lambda ex: [e for e in ex if e != "mm_projector*"] + projector)
    out["kimi_k25/projector_exact"] = exact
    # Earlier outputs: the lists this tool wrote before it knew vLLM's names.
    for key, edit in {
        "llama/tied": lambda ex: [e for e in ex if e != "lm_head"],
        "llama/exclude_k_proj": lambda ex: [e for e in ex if not e.endswith("qkv_proj")],
        "deepseek_v3/exclude_q_a_proj": lambda ex: [e for e in ex if not e.endswith("fused_qkv_a_proj")],
        # One expert named: vLLM's FusedMoE prefix is a substring of the entry, so the whole MoE layer
        # is read as excluded although its experts are NVFP4 (is_layer_skipped's "experts" rule).
        "qwen3_moe/default/one_expert": lambda ex: [*ex, "model.layers.0.mlp.experts.1.down_proj"],
        # One shard named exactly, its partners only by wildcard: vLLM refuses to load.
        "llama/exclude_k_proj/exact": lambda ex: [
            *(e for e in ex if "self_attn" not in e),
            "model.layers.0.self_attn.k_proj",
            "model.layers.*.self_attn.[qv]_proj",
            "model.layers.1.self_attn.k_proj",
        ],
    }.items():
        source = key.removesuffix("/exact").removesuffix("/one_expert")
        old = base / f"{key.replace('/', '-')}-old"
        shutil.copytree(out[source], old)
        rewrite_exclusions(old, edit)
        out[f"{key}/old"] = old
    return out


@pytest.fixture(scope="module")
def vllm_answers(outputs, vllm_python) -> dict[str, dict]:
    stubbed = [p for k, p in outputs.items() if k.startswith(NEEDS_TORCHVISION_STUB)]
    answers = oracle(vllm_python).layers([p for p in outputs.values() if p not in stubbed])
    answers |= oracle(vllm_python, torchvision_stub=True).layers(stubbed)
    by_key = {key: answers[str(path)] for key, path in outputs.items()}
    broken = {k: v["error"][-2000:] for k, v in by_key.items() if "error" in v}
    assert not broken, broken
    return by_key


NOTHING_QUANTIZED = "llama/experts_only"


def current(outputs):
    return [k for k in outputs if not k.endswith("/old")]


def test_vllm_decision_agrees_with_tensors_for_every_layer_it_builds(outputs, vllm_answers):
    failures = []
    for key in current(outputs):
        answer = vllm_answers[key]
        vllm = vllm_decisions(answer)
        tensors = tensor_decisions(answer, outputs[key])
        assert vllm, key
        for prefix, decision in vllm.items():
            held = tensors[prefix]
            if decision != held:
                failures.append(f"{key}: {prefix}: vLLM {decision}, tensors {held}")
    assert not failures, "\n".join(failures)


def test_every_case_quantizes_something_and_leaves_something(outputs, vllm_answers):
    """The matrix really exercises both decisions (a test that saw only one could not fail)."""
    for key in current(outputs):
        decisions = set(vllm_decisions(vllm_answers[key]).values())
        # A dense model has no routed experts: --experts_only leaves every layer unquantized.
        assert ("nvfp4" in decisions) == (key != NOTHING_QUANTIZED), key
        # GPT-OSS builds its lm_head and routers without the quant config: by default it asks only about
        # layers it quantizes.
        assert ("unquantized" in decisions) == (key != "gpt_oss/default"), key
    tied = vllm_decisions(vllm_answers["llama/tied"])
    assert tied["lm_head"] == "unquantized"
    moe = vllm_decisions(vllm_answers["qwen3_moe/exclude_expert"])
    assert moe["model.layers.1.mlp.experts"] == "unquantized" and moe["model.layers.0.mlp.experts"] == "nvfp4"
    qkv = vllm_decisions(vllm_answers["llama/exclude_k_proj"])
    assert qkv["model.layers.0.self_attn.qkv_proj"] == "unquantized"
    assert qkv["model.layers.0.self_attn.o_proj"] == "nvfp4"
    mla = vllm_decisions(vllm_answers["kimi_k25/exclude_q_a_proj"])
    assert mla["language_model.model.layers.0.self_attn.fused_qkv_a_proj"] == "unquantized"
    gpt = vllm_decisions(vllm_answers["gpt_oss/default"])
    # GPT-OSS 3-D experts: NVFP4 once quantized (ModelOpt 0.47 layout), and vLLM sees them so.
    assert gpt["model.layers.0.mlp.experts"] == "nvfp4"
    assert gpt["model.layers.0.attn.qkv_proj"] == "nvfp4"


def test_earlier_outputs_fail_in_vllm_and_in_validate(outputs, vllm_answers):
    expected = {
        "llama/tied/old": "lm_head",
        "llama/exclude_k_proj/old": "model.layers.0.self_attn.qkv_proj",
        "deepseek_v3/exclude_q_a_proj/old": "model.layers.0.self_attn.fused_qkv_a_proj",
    }
    for key, layer in expected.items():
        answer = vllm_answers[key]
        vllm = vllm_decisions(answer)
        tensors = tensor_decisions(answer, outputs[key])
        assert vllm[layer] == "nvfp4" and tensors[layer] == "unquantized", key
        report = validate(outputs[key])
        assert not report.ok, key
        messages = [f.message for f in report.findings if f.level == "error" and f.check == "consumer"]
        assert any(m.startswith(f"{layer}") and "vLLM builds it NVFP4" in m for m in messages), (key, messages)


def test_one_listed_expert_unquantizes_the_moe_layer_in_vllm_and_validate_says_so(outputs, vllm_answers):
    key, layer = "qwen3_moe/default/one_expert/old", "model.layers.0.mlp.experts"
    answer = vllm_answers[key]
    assert vllm_decisions(answer)[layer] == "unquantized"
    assert tensor_decisions(answer, outputs[key])[layer] == "nvfp4"
    messages = [f.message for f in validate(outputs[key]).findings if f.check == "consumer"]
    assert any(m.startswith(layer) and "vLLM builds it unquantized" in m for m in messages), messages


def test_one_shard_named_exactly_makes_vllm_refuse_and_validate_says_so(outputs, vllm_answers):
    key, layer = "llama/exclude_k_proj/exact/old", "model.layers.0.self_attn.qkv_proj"
    assert vllm_decisions(vllm_answers[key])[layer] == "refused"
    messages = [f.message for f in validate(outputs[key]).findings if f.check == "consumer"]
    assert any(m.startswith(layer) and "vLLM refuses to load" in m for m in messages), messages


def test_validate_accepts_every_current_output(outputs):
    for key in current(outputs):
        report = validate(outputs[key], block_scales=False)
        errors = [f.message for f in report.findings if f.level == "error"]
        assert errors == (["no quantized module found"] if key == NOTHING_QUANTIZED else []), key


def test_consumer_table_matches_the_classes(outputs, vllm_answers):
    """Our consumer rules (used by export and validate) name the same layers vLLM asks about and reach the
    same decisions, with the class's packed_modules_mapping as vLLM hands it to the quant config."""
    for key in outputs:
        answer = vllm_answers[key]
        config = json.loads((outputs[key] / "config.json").read_text())
        family = family_of(config)
        assert family is not None, key
        names = tensor_names(outputs[key])
        modules = {
            t.removesuffix(".weight") if t.endswith(".weight") else t
            for t, shape in names.items()
            if (t.endswith(".weight") and len(shape) == 2) or _EXPERTS_3D.search(t)  # Linear weights
        }
        ours = {lay.prefix: lay for lay in consumer_layers(modules, config, family)}
        vllm = vllm_decisions(answer)
        asked = {p for p, lay in ours.items() if lay.asked}
        assert asked == set(vllm), (key, asked ^ set(vllm))
        assert family.packed(config.get("text_config") or config) == answer["packed_modules_mapping"], key
        exclusion = VllmExclusion(config["quantization_config"]["ignore"], family, config)
        assert sorted(exclusion.entries) == sorted(answer["exclude_modules"]), key
        for prefix in asked:
            try:
                decision = "nvfp4" if exclusion.quantizes(ours[prefix]) else "unquantized"
            except PartlyExcludedFusedLayer:
                decision = "refused"
            assert decision == vllm[prefix], (key, prefix)
