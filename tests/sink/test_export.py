"""Config files tell the exact truth about the tensors written."""

import json

import pytest
from checkpoints import checkpoint_layout, load_dir, make_weights, round_robin, write_checkpoint
from vllm_oracle.client import disagreements, oracle, vllm_decisions

from modelopt_streaming import quantize
from modelopt_streaming.sink.export import compact_exclusions, hf_quant_config, model_config


def deepseek_names(layers=61, experts=256, dense=3):
    names = ["model.embed_tokens", "lm_head"]
    for i in range(layers + 1):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{x}" for x in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
        if i < dense:
            names += [f"{p}.mlp.{x}" for x in ("gate_proj", "up_proj", "down_proj")]
        else:
            names.append(f"{p}.mlp.gate")
            names += [f"{p}.mlp.shared_experts.{x}" for x in ("gate_proj", "up_proj", "down_proj")]
            names += [f"{p}.mlp.experts.{e}.{x}" for e in range(experts) for x in ("gate_proj", "up_proj", "down_proj")]
    if layers == 61:
        names += ["model.layers.61.eh_proj", "model.layers.61.shared_head.head"]
    return names


def test_compaction_on_full_size_deepseek_names_is_exact_under_vllm_rules(tmp_path, vllm_python):
    """The list for full-size DeepSeek-V3 names (61 layers, 256 experts), judged by vLLM's own code: its
    model class is built from the full-size config on the meta device (vllm_oracle/asked_layers.py) and
    every layer it asks about must get the decision the names say."""
    import transformers as tf

    names = deepseek_names()
    unquantized = [
        n
        for n in names
        if "self_attn" in n
        or n.endswith("mlp.gate")
        or n in ("lm_head", "model.embed_tokens")
        or n.startswith("model.layers.61.")
    ]
    config = {**tf.DeepseekV3Config().to_dict(), "architectures": ["DeepseekV3ForCausalLM"]}
    result = compact_exclusions(unquantized, names, config)
    assert len(result) < 10, result
    assert "model.layers.61.*" in result and "model.layers.6*" not in result
    (tmp_path / "config.json").write_text(json.dumps(model_config(config, result, weight_only=False)))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(hf_quant_config(result, weight_only=False)))
    answer = oracle(vllm_python).layers([tmp_path])[str(tmp_path)]
    assert "error" not in answer, answer["error"]
    unq = set(unquantized)
    files = {f"{n}.weight": (2, 2) for n in names} | {f"{n}.weight_scale": (2, 1) for n in names if n not in unq}
    assert not disagreements(answer, tmp_path, names=files)
    decided = vllm_decisions(answer)
    # MLA (fused_qkv_a_proj, q_b_proj, kv_b_proj, o_proj), 3 dense MLPs, 58 MoE layers (shared gate_up and
    # down, FusedMoE experts), lm_head; routers are built without the quant config, the MTP layer not at all.
    assert len(decided) == 61 * 4 + 3 * 2 + 58 * 3 + 1
    assert decided["model.layers.5.self_attn.fused_qkv_a_proj"] == "unquantized"
    assert decided["model.layers.5.mlp.experts"] == decided["model.layers.6.mlp.experts"] == "nvfp4"


def test_compaction_leaves_exact_names_when_no_wildcard_is_exact():
    names = [f"a.layers.{i}.mlp.{x}" for i in (0, 1) for x in ("gate_proj", "up_proj", "down_proj")] + ["lm_head"]
    assert compact_exclusions(["a.layers.0.mlp.down_proj", "lm_head"], names) == ["a.layers.0.mlp.down_proj", "lm_head"]


@pytest.fixture
def source_with_extras(tmp_path):
    layout, cfg = checkpoint_layout("deepseek_v3")
    cfg = dict(cfg, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    extras = {
        "tokenizer.json": "{}",
        "tokenizer_config.json": '{"chat_template": "x"}',
        "tiktoken.model": "abc",
        "chat_template.jinja": "{{ x }}",
        "generation_config.json": '{"do_sample": true}',
        "modeling_deepseek.py": "raise SystemExit('model code must be copied, never run')\n",
        "assets/notes.txt": "hello",
        ".git/config": "never copied",
    }
    return write_checkpoint(tmp_path / "src", make_weights(layout), cfg, round_robin(2), extras)


def test_side_files_copied_and_stale_quantization_config_replaced(source_with_extras, tmp_path):
    out = tmp_path / "out"
    quantize(source_with_extras, out, mlp_only=True, weight_only=True, progress="none")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "tiktoken.model",
        "chat_template.jinja",
        "generation_config.json",
        "modeling_deepseek.py",
        "assets/notes.txt",
    ):
        assert (out / name).read_text() == (source_with_extras / name).read_text(), name
    assert not (out / ".git").exists()
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "W4A16_NVFP4"
    assert "fmt" not in qc and "weight_block_size" not in qc
    assert "input_activations" not in qc["config_groups"]["group_0"]
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "W4A16_NVFP4"
    assert set(hf["quantization"]) >= {"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"}
    assert not any(k.endswith("input_scale") for k in load_dir(out))
    provenance = json.loads((out / "modelopt_streaming.json").read_text())
    assert provenance["counts"]["fused_groups"] == {"gate/up": 11}
    assert provenance["options"]["scope"] == "mlp" and provenance["options"]["weight_only"] is True
    assert set(provenance["source"]["files"]) == {p.name for p in source_with_extras.glob("*.safetensors")}
    # Every tensor written is in the index, with the exact total size.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = load_dir(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_source_directory_is_never_written(source_with_extras, tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in source_with_extras.rglob("*") if p.is_file()}
    quantize(source_with_extras, tmp_path / "out", progress="none")
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in source_with_extras.rglob("*") if p.is_file()}
    assert before == after
