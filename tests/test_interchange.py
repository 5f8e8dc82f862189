"""Interchange (issue 11): compressed-tensors output, lossless convert, decompress, a reference's input scales,
JSON. Oracles: the compressed-tensors library's own decompressor and config schema, a hand-written spec
dequantization, NVIDIA ModelOpt's calibrated export, transformers' plain models; nothing is downloaded."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from checkpoints import compressed_tensors_nvfp4a16, load_dir, make_model_checkpoint, rewrite_tensor
from checkpoints_extra import calibrated_modelopt_export, deepseek_fp8_checkpoint, kimi_int4_checkpoint

from modelopt_streaming import quantize
from modelopt_streaming.cli import main
from modelopt_streaming.errors import ConversionRefused
from modelopt_streaming.jobs.convert import convert
from modelopt_streaming.jobs.decompress import decompress
from modelopt_streaming.validate import validate

QUIET = dict(progress="none")
ARCHS = ["llama", "qwen3_moe", "deepseek_v3"]
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def spec_dequantize(packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """Spec section 1.6-1.7, written here independently of the codec: low nibble first, E2M1 value times
    (fp32 block scale * global scale), float32."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1).long()
    values = E2M1[codes].reshape(packed.shape[0], -1, 16)
    return (values * (weight_scale.float() * weight_scale_2.float()).unsqueeze(-1)).reshape(packed.shape[0], -1)


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(raw(a[k]), raw(b[k])), k


def modelopt_modules(tensors: dict) -> list[str]:
    return sorted(k[: -len(".weight_scale_2")] for k in tensors if k.endswith(".weight_scale_2"))


def assert_loaded(model, tensors: dict[str, torch.Tensor], modules: list[str]) -> None:
    """transformers loaded these tensors: every module's weight is a parameter of the model, or a slice of
    the 3-D expert parameters transformers 5 fuses routed experts into (``experts.gate_up_proj`` [E, 2I, H]
    = gate then up, ``experts.down_proj`` [E, H, I])."""
    params = dict(model.named_parameters())
    mtp = f"layers.{model.config.num_hidden_layers}."  # DeepSeek's MTP layer: not part of transformers' model
    for m in modules:
        if mtp in m:
            continue
        weight = tensors[f"{m}.weight"]
        if f"{m}.weight" in params:
            assert torch.equal(params[f"{m}.weight"], weight), m
            continue
        experts, index, leaf = m.rsplit(".", 2)
        if leaf == "down_proj":
            got = params[f"{experts}.down_proj"][int(index)]
        else:
            halves = params[f"{experts}.gate_up_proj"][int(index)].chunk(2, dim=0)
            got = halves[0 if leaf == "gate_proj" else 1]
        assert torch.equal(got, weight), m


@pytest.fixture(scope="module", params=ARCHS)
def outputs(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    src = make_model_checkpoint(base / "src", request.param, n_shards=3)
    quantize(src, base / "mo", **QUIET)
    quantize(src, base / "ct", format="compressed-tensors", **QUIET)
    return base, src, base / "mo", base / "ct"


def ct_dequantize(packed: torch.Tensor, weight_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The compressed-tensors reading of the same codes: the block scale divided by the stored divisor."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1).long()
    values = E2M1[codes].reshape(packed.shape[0], -1, 16)
    return (values * (weight_scale.float() / global_scale.float()).unsqueeze(-1)).reshape(packed.shape[0], -1)


def test_compressed_tensors_library_decompresses_to_the_spec_values(outputs):
    """Our --format compressed-tensors output, read by that library (its config schema, its decompressor),
    gives our ModelOpt output's values. Exactly wherever the two formats' block scales agree; they can
    disagree, since compressed-tensors divides by ``1/weight_scale_2`` where ModelOpt multiplies by
    ``weight_scale_2`` and the float32 reciprocal is rounded: there, by one bf16 rounding at most, in under
    0.2% of the values. No choice of the stored float32 divisor avoids that for every scale (checked
    over every global scale a bf16 weight can have): it is the format's, not the writer's."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    _, _, mo_dir, ct_dir = outputs
    qc = QuantizationConfig.model_validate(json.loads((ct_dir / "config.json").read_text())["quantization_config"])
    assert qc.format == "nvfp4-pack-quantized" and qc.quantization_status == "compressed"
    (scheme,) = qc.config_groups.values()
    assert scheme.input_activations is not None and scheme.input_activations.dynamic == "local"
    mo, ct = load_dir(mo_dir), load_dir(ct_dir)
    modules = modelopt_modules(mo)
    values = differing = 0
    for m in modules:
        got = NVFP4PackedCompressor.decompress(
            {k: ct[f"{m}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale")}, scheme
        )["weight"]
        ws, ws2, gs = mo[f"{m}.weight_scale"], mo[f"{m}.weight_scale_2"], ct[f"{m}.weight_global_scale"]
        assert torch.equal(got, ct_dequantize(ct[f"{m}.weight_packed"], ct[f"{m}.weight_scale"], gs).to(torch.bfloat16))
        want = spec_dequantize(mo[f"{m}.weight"], ws, ws2).to(torch.bfloat16)
        agree = (ws.float() * ws2 == ws.float() / gs).repeat_interleave(16, dim=1)
        assert got.dtype == torch.bfloat16 and torch.equal(got[agree], want[agree]), m
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()
        assert ((got.float() - want.float()).abs() <= ulp).all(), m
        values += got.numel()
        differing += int((got != want).sum())
        # The same bytes under other names; global scales as float32 [1] reciprocals.
        assert torch.equal(ct[f"{m}.weight_packed"], mo[f"{m}.weight"])
        assert torch.equal(raw(ct[f"{m}.weight_scale"]), raw(mo[f"{m}.weight_scale"]))
        for c, o in (("weight_global_scale", "weight_scale_2"), ("input_global_scale", "input_scale")):
            assert ct[f"{m}.{c}"].shape == (1,) and ct[f"{m}.{c}"].dtype == torch.float32
            assert torch.equal(ct[f"{m}.{c}"], (torch.ones(1) / mo[f"{m}.{o}"].reshape(1)))
    print(f"{differing} of {values} values differ by one bf16 rounding")
    assert len(modules) >= 14 and differing <= values // 500
    leaves = (".weight_scale_2", ".input_scale", ".weight_global_scale", ".input_global_scale", ".weight_packed")
    assert {k for k in mo if k.rpartition(".")[0] not in modules} == {k for k in ct if not k.endswith(leaves)} - {
        f"{m}.weight_scale" for m in modules
    }
    report = validate(ct_dir)
    assert report.ok, report.text()
    assert report.format == "compressed-tensors" and report.quantized_modules == len(modules)


def test_compressed_tensors_ignore_names_every_unquantized_linear(outputs):
    """vLLM's compressed-tensors path matches ``ignore`` exactly or by ``re:`` only: every unquantized Linear
    (and lm_head) by its exact name, no quantized module."""
    _, _, mo_dir, ct_dir = outputs
    ignore = json.loads((ct_dir / "config.json").read_text())["quantization_config"]["ignore"]
    mo = load_dir(mo_dir)
    quantized = set(modelopt_modules(mo))
    unquantized = {
        k[: -len(".weight")]
        for k, t in mo.items()
        if k.endswith(".weight") and t.dim() == 2 and t.dtype == torch.bfloat16 and "embed_tokens" not in k
    }
    assert set(ignore) == unquantized | {"lm_head"} and not quantized & set(ignore)
    assert not (ct_dir / "hf_quant_config.json").exists()


def test_convert_round_trip_is_byte_identical(outputs, tmp_path):
    base, _, mo_dir, ct_dir = outputs
    s1 = convert(mo_dir, tmp_path / "ct", "compressed-tensors")
    s2 = convert(tmp_path / "ct", tmp_path / "mo", "modelopt")
    assert s1.reciprocals == s2.reciprocals >= 28 and not s1.output_findings and not s2.output_findings
    names = sorted(p.name for p in mo_dir.iterdir() if p.suffix == ".safetensors") + [
        "config.json",
        "hf_quant_config.json",
        "model.safetensors.index.json",
    ]
    assert all(filecmp.cmp(mo_dir / n, tmp_path / "mo" / n, shallow=False) for n in names)
    # convert(quantize --format modelopt) is quantize --format compressed-tensors, tensor for tensor, and the
    # other way round, file for file: quantize keeps its exact-reciprocal record as convert does.
    same_tensors(load_dir(tmp_path / "ct"), load_dir(ct_dir))
    assert json.loads((ct_dir / "modelopt_streaming.json").read_text())["exact_reciprocals"]
    convert(ct_dir, tmp_path / "mo_from_ct", "modelopt")
    assert all(filecmp.cmp(mo_dir / n, tmp_path / "mo_from_ct" / n, shallow=False) for n in names)


def test_reciprocals_that_do_not_invert_back_are_restored_exactly(tmp_path):
    """1/(1/x) != x in float32 for about one global scale in six: the conversion keeps those source values
    in its provenance. Calibrated input scales (NVIDIA ModelOpt's export) and another producer's configs
    come back exactly too."""
    src = make_model_checkpoint(tmp_path / "src", "llama", n_shards=2)
    export = calibrated_modelopt_export(src, tmp_path / "modelopt")
    start = load_dir(export)
    scalars = [k for k in start if k.endswith(("weight_scale_2", "input_scale"))]
    lossy = [k for k in scalars if not torch.equal(1 / (1 / start[k]), start[k])]
    assert lossy, "the test needs scales whose float32 reciprocal does not invert back"
    assert len({float(start[k]) for k in scalars if k.endswith("input_scale")}) > 4  # calibrated, not 1.0
    convert(export, tmp_path / "ct", "compressed-tensors")
    record = json.loads((tmp_path / "ct" / "modelopt_streaming.json").read_text())["exact_reciprocals"]
    assert len(record) == len(lossy)
    convert(tmp_path / "ct", tmp_path / "back", "modelopt")
    same_tensors(load_dir(tmp_path / "back"), start)
    for name in ("config.json", "hf_quant_config.json"):
        assert json.loads((tmp_path / "back" / name).read_text()) == json.loads((export / name).read_text()), name


def _unequal_groups(ct: dict) -> set[str]:
    """Fused groups whose members' weight_global_scale differ, found here from the tensors."""
    groups: dict[tuple[str, str], list[bytes]] = {}
    kinds = {"q_proj": "q/k/v", "k_proj": "q/k/v", "v_proj": "q/k/v", "gate_proj": "gate/up", "up_proj": "gate/up"}
    for k, t in ct.items():
        if k.endswith(".weight_global_scale"):
            parent, _, leaf = k[: -len(".weight_global_scale")].rpartition(".")
            if leaf in kinds:
                groups.setdefault((kinds[leaf], parent), []).append(t.numpy().tobytes())
    return {f"{kind} {parent}" for (kind, parent), bits in groups.items() if len(set(bits)) > 1}


def test_unequal_fused_scales_refused_then_forced(tmp_path, capsys):
    """llm-compressor's model-free path quantizes each Linear on its own global scale: convert refuses and
    lists every such group; --force converts unchanged, and validate then reports exactly those groups."""
    src = make_model_checkpoint(tmp_path / "src", "qwen3_moe", n_shards=2)
    ct_dir = compressed_tensors_nvfp4a16(src, tmp_path / "llmc")
    ct = load_dir(ct_dir)
    unequal = _unequal_groups(ct)
    assert len(unequal) >= 8
    with pytest.raises(ConversionRefused) as refused:
        convert(ct_dir, tmp_path / "refused", "modelopt")
    listed = {line.strip().split(":")[0] for line in str(refused.value).splitlines()[1:]}
    assert listed == unequal
    assert not (tmp_path / "refused").exists()
    assert main(["convert", str(ct_dir), str(tmp_path / "refused"), "--to", "modelopt"]) == 1
    assert "fused group(s)" in capsys.readouterr().err
    out = tmp_path / "forced"
    assert main(["convert", str(ct_dir), str(out), "--to", "modelopt", "--force"]) == 0
    mo = load_dir(out)
    for m in modelopt_modules(mo):  # unchanged: the same codes, block scales and (inverted) global scales
        assert torch.equal(mo[f"{m}.weight"], ct[f"{m}.weight_packed"])
        assert torch.equal(raw(mo[f"{m}.weight_scale"]), raw(ct[f"{m}.weight_scale"]))
        assert torch.equal(mo[f"{m}.weight_scale_2"].reshape(1), torch.ones(1) / ct[f"{m}.weight_global_scale"])
    report = validate(out)
    reported = {
        f"{kind} {line.split(':')[0]}" for kind, g in report.groups.items() for line in g.mismatched if g.mismatched
    }
    assert reported == unequal and not report.ok
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "W4A16_NVFP4"
    # Another producer's compressed-tensors checkpoint decompresses as that library decompresses it.
    decompress(ct_dir, tmp_path / "dense")
    dense = load_dir(tmp_path / "dense")
    for m in modelopt_modules(mo):
        packed, scale, divisor = (ct[f"{m}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale"))
        assert torch.equal(dense[f"{m}.weight"], ct_dequantize(packed, scale, divisor).to(torch.bfloat16)), m


def test_decompress_nvfp4_equals_the_spec_in_both_dialects(outputs, tmp_path):
    import transformers as tf

    _, src, mo_dir, ct_dir = outputs
    decompress(mo_dir, tmp_path / "from_mo")
    decompress(ct_dir, tmp_path / "from_ct")
    mo, source = load_dir(mo_dir), load_dir(src)
    modules = modelopt_modules(mo)
    want = {
        f"{m}.weight": spec_dequantize(mo[f"{m}.weight"], mo[f"{m}.weight_scale"], mo[f"{m}.weight_scale_2"]).to(
            torch.bfloat16
        )
        for m in modules
    }
    want.update({k: v for k, v in source.items() if k not in want})
    same_tensors(load_dir(tmp_path / "from_mo"), want)
    # The compressed-tensors dialect by its own definition (the divisor), as that library decompresses it.
    ct = load_dir(ct_dir)
    want_ct = dict(want)
    for m in modules:
        packed, scale, divisor = (ct[f"{m}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale"))
        want_ct[f"{m}.weight"] = ct_dequantize(packed, scale, divisor).to(torch.bfloat16)
    same_tensors(load_dir(tmp_path / "from_ct"), want_ct)
    for out in ("from_mo", "from_ct"):
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert "quantization_config" not in config and not (tmp_path / out / "hf_quant_config.json").exists()
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "from_ct", dtype=torch.bfloat16)
    assert_loaded(model, want_ct, modules)


def test_decompress_fp32_keeps_the_spec_value_unrounded(outputs, tmp_path):
    _, _, mo_dir, _ = outputs
    decompress(mo_dir, tmp_path / "fp32", "fp32")
    mo, dense = load_dir(mo_dir), load_dir(tmp_path / "fp32")
    for m in modelopt_modules(mo):
        assert torch.equal(
            dense[f"{m}.weight"], spec_dequantize(mo[f"{m}.weight"], mo[f"{m}.weight_scale"], mo[f"{m}.weight_scale_2"])
        )


@pytest.mark.parametrize("make", [deepseek_fp8_checkpoint, kimi_int4_checkpoint], ids=["deepseek_fp8", "kimi_int4"])
def test_decompress_vendor_formats(make, tmp_path):
    """DeepSeek's block FP8 equals DeepSeek's own formula, Kimi's INT4 equals compressed-tensors' own
    decompressor; transformers loads the result as a plain DeepSeek-V3."""
    import transformers as tf

    src, expected = make(tmp_path / "src")
    summary = decompress(src, tmp_path / "dense")
    dense = load_dir(tmp_path / "dense")
    assert sum(summary.dequantized.values()) == len(expected) >= 8
    for name, value in expected.items():
        assert torch.equal(dense[name], value), name
    assert not any(k.endswith(("_scale_inv", "weight_packed", "weight_shape")) for k in dense)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    assert_loaded(model, {**load_dir(tmp_path / "dense"), **expected}, [k[: -len(".weight")] for k in expected])


def test_input_scales_from_a_calibrated_modelopt_export(tmp_path):
    """With NVIDIA ModelOpt's calibrated export as the reference, every tensor of ours is that export's,
    input_scale included; the same through its compressed-tensors conversion; a module the reference lacks
    is reported and keeps 1.0."""
    src = make_model_checkpoint(tmp_path / "src", "llama", n_shards=3)
    export = calibrated_modelopt_export(src, tmp_path / "modelopt")
    ref = load_dir(export)
    summary = quantize(src, tmp_path / "ours", scale_math="cpu", input_scales_from=export, **QUIET)
    assert summary.input_scales_missing == []
    same_tensors(load_dir(tmp_path / "ours"), ref)
    convert(export, tmp_path / "ref_ct", "compressed-tensors")
    quantize(src, tmp_path / "ours2", scale_math="cpu", input_scales_from=tmp_path / "ref_ct", **QUIET)
    same_tensors(load_dir(tmp_path / "ours2"), ref)
    # A reference without one module's input scale.
    cut = tmp_path / "cut"
    cut.mkdir()
    for p in export.iterdir():
        if p.is_file():
            (cut / p.name).write_bytes(p.read_bytes())

    gone = "model.layers.1.mlp.down_proj.input_scale"
    rewrite_tensor(cut, gone, None)
    # Members of a fused group with different input scales in the reference: ours share the largest.
    qkv = [f"model.layers.0.self_attn.{x}_proj.input_scale" for x in "qkv"]
    larger = ref[qkv[1]] * 3
    rewrite_tensor(cut, qkv[1], larger)
    index_file = cut / "model.safetensors.index.json"
    if index_file.exists():  # ModelOpt writes one file for a model this small
        index = json.loads(index_file.read_text())
        del index["weight_map"][gone]
        index_file.write_text(json.dumps(index))
    summary = quantize(src, tmp_path / "ours3", scale_math="cpu", input_scales_from=cut, **QUIET)
    assert summary.input_scales_missing == ["model.layers.1.mlp.down_proj"]
    ours3 = load_dir(tmp_path / "ours3")
    assert float(ours3[gone]) == 1.0 and any("not in the reference" in line for line in summary.lines())
    assert all(torch.equal(ours3[k], larger) for k in qkv)
    changed = {gone, *qkv}
    same_tensors({k: v for k, v in ours3.items() if k not in changed}, {k: ref[k] for k in ref if k not in changed})


def test_json_summary_and_plan(tmp_path, capsys):
    src = make_model_checkpoint(tmp_path / "src", "deepseek_v3", n_shards=2)
    assert main(["quantize", "--input_dir", str(src), "--dry_run", "--json", "--mlp_only"]) == 0
    data = json.loads(capsys.readouterr().out)
    plan = data["plan"]
    assert data["dry_run"] and data["quantized_weights"] == sum(len(v) for v in plan["quantized_by_kind"].values())
    by_reason = plan["unquantized_by_reason"]
    assert "model.layers.0.self_attn.q_a_proj" in by_reason["outside --mlp_only scope"]
    assert by_reason["lm_head"] == ["lm_head"] and "model.layers.3.mlp.experts.0.up_proj" in by_reason["MTP layer"]
    assert ["model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.0.up_proj"] in [
        sorted(g) for g in plan["fused_groups"]["gate/up"]
    ]
    assert len(plan["fused_groups"]["gate/up"]) == data["fused_groups"]["gate/up"]
    out = tmp_path / "out"
    assert main(["quantize", "--input_dir", str(src), "--output_dir", str(out), "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert not data["dry_run"] and data["output_dir"] == str(out) and data["format"] == "modelopt"


def test_transformers_runs_the_dense_compressed_tensors_output(tmp_path):
    """transformers with compressed-tensors loads our weight-only (NVFP4A16) dense output and its logits are
    those of a plain bf16 Llama holding the spec's dequantization of our ModelOpt output, bit for bit. (For
    W4A4 transformers also quantizes activations on the fly, which no bf16 reference reproduces; the W4A4
    output's weights are checked against the library above.)"""
    import transformers as tf
    from safetensors.torch import save_file

    src = make_model_checkpoint(tmp_path / "src", "llama", n_shards=2)
    quantize(src, tmp_path / "mo", weight_only=True, **QUIET)
    quantize(src, tmp_path / "ct", weight_only=True, format="compressed-tensors", **QUIET)
    mo = load_dir(tmp_path / "mo")
    modules = modelopt_modules(mo)
    dense = load_dir(src)
    for m in modules:
        value = spec_dequantize(mo[f"{m}.weight"], mo[f"{m}.weight_scale"], mo[f"{m}.weight_scale_2"])
        dense[f"{m}.weight"] = value.to(torch.bfloat16)
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    save_file(dense, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    (ref_dir / "config.json").write_text((src / "config.json").read_text())
    ids = torch.tensor([[1, 5, 9, 33, 70, 100, 3, 250, 17]])
    with torch.no_grad():
        want = tf.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16).eval()(ids).logits
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16).eval()
        got = model(ids).logits
    assert torch.equal(got, want)
    assert_loaded(model, dense, modules)
    # Logits that depend on the quantized weights: the source model's differ.
    with torch.no_grad():
        source = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()(ids).logits
    assert not torch.equal(source, want)


def test_vllm_serves_the_compressed_tensors_output(tmp_path, vllm_python):
    """vLLM's CPU build (with its NVFP4 emulation kernel) loads our dense W4A4 compressed-tensors output through
    its compressed-tensors path, builds every quantized layer as CompressedTensorsW4A4Fp4 and lm_head
    unquantized, and decodes the tokens it decodes from our ModelOpt output of the same source."""
    import subprocess

    from checkpoints import tied_llama_checkpoint

    src = tied_llama_checkpoint(tmp_path / "src")
    quantize(src, tmp_path / "mo", **QUIET)
    quantize(src, tmp_path / "ct", format="compressed-tensors", **QUIET)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[1, 5, 9, 33], [70, 100, 3, 250], [12, 200, 45], [300, 2, 77, 150, 8]]))
    script = Path(__file__).parent / "vllm_oracle" / "load_checkpoint.py"
    results = {}
    for name in ("mo", "ct"):
        out = tmp_path / f"{name}.json"
        run = subprocess.run(
            [str(vllm_python), str(script), str(tmp_path / name), str(prompts), "6", str(out)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = json.loads(out.read_text())
    ct = results["ct"]
    assert ct["quantization"] == "compressed-tensors" and results["mo"]["quantization"] == "modelopt_fp4"
    linear = {k: v for k, v in ct["layers"].items() if k.rpartition(".")[2] in ("qkv_proj", "o_proj", "gate_up_proj")}
    linear.update({k: v for k, v in ct["layers"].items() if k.endswith("down_proj")})
    assert len(linear) == 8 and all(v["scheme"] == "CompressedTensorsW4A4Fp4" for v in linear.values())
    assert ct["layers"]["lm_head"]["scheme"] is None
    assert ct["tokens"] == results["mo"]["tokens"] and len(ct["tokens"]) == 4


@pytest.fixture(scope="module")
def sharded_output(tmp_path_factory):
    """Our ModelOpt output of a tiny Qwen3-MoE in several shards."""
    base = tmp_path_factory.mktemp("sharded")
    src = make_model_checkpoint(base / "src", "qwen3_moe", n_shards=2)
    quantize(src, base / "mo", max_shard_size=30_000, **QUIET)
    assert len(list((base / "mo").glob("*.safetensors"))) >= 3
    return src, base / "mo"


@pytest.mark.parametrize("fault", ["mid_tensor:3", "after_rename:2", "json:3"])
@pytest.mark.parametrize("command", ["convert", "decompress", "quantize"])
def test_killed_run_resumes_to_the_same_bytes(sharded_output, tmp_path, command, fault):
    """SIGKILL at a step where a crash matters: the directory never looks loadable (no config.json), and
    --resume finishes it byte-identical to an uninterrupted run, provenance included (quantize
    --format compressed-tensors keeps its exact-reciprocal record with each finished shard)."""
    import os
    import subprocess
    import sys

    src, mo = sharded_output
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = {
        "convert": lambda out: [str(mo), str(out), "--to", "compressed-tensors"],
        "decompress": lambda out: [str(mo), str(out), "--max_shard_size", "150000"],
        "quantize": lambda out: (
            ["--input_dir", str(src), "--output_dir", str(out), "--quiet"]
            + ["--format", "compressed-tensors", "--max_shard_size", "30000", "--device", "cpu"]
        ),
    }[command]
    assert main([command, *args(whole)]) == 0
    cmd = [sys.executable, "-m", "modelopt_streaming", command, *args(broken)]
    env = dict(os.environ, MODELOPT_STREAMING_FAULT=fault)
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (broken / "config.json").exists()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    names = sorted(p.name for p in whole.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in broken.iterdir() if not p.name.startswith("."))
    assert all(filecmp.cmp(whole / n, broken / n, shallow=False) for n in names)


def test_refusals_are_one_line_and_write_nothing(outputs, tmp_path, capsys):
    base, src, mo_dir, ct_dir = outputs
    cases = [
        (["convert", str(src), str(tmp_path / "a"), "--to", "compressed-tensors"], 1, "not an NVFP4 checkpoint"),
        (["convert", str(ct_dir), str(tmp_path / "b"), "--to", "compressed-tensors"], 2, "already in"),
        (["decompress", str(mo_dir), str(mo_dir / "inside")], 2, "inside"),
        (["decompress", str(mo_dir), str(ct_dir)], 2, "not empty"),
    ]
    for argv, code, words in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (mo_dir / "inside").exists()


def test_compressed_tensors_has_no_form_for_3d_experts(tmp_path):
    from checkpoints_extra import make_gpt_oss_checkpoint

    from modelopt_streaming.errors import UsageError

    src = make_gpt_oss_checkpoint(tmp_path / "src")
    with pytest.raises(UsageError, match="3-D fused experts"):
        quantize(src, tmp_path / "out", format="compressed-tensors", **QUIET)
    assert not (tmp_path / "out").exists()
    quantize(src, tmp_path / "mo", **QUIET)
    with pytest.raises(ConversionRefused, match="3-D fused experts"):
        convert(tmp_path / "mo", tmp_path / "ct", "compressed-tensors")
    # Their ModelOpt form decompresses, expert by expert, to the spec's values.
    decompress(tmp_path / "mo", tmp_path / "dense")
    mo, dense = load_dir(tmp_path / "mo"), load_dir(tmp_path / "dense")
    cubes = [k for k in mo if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert cubes
    for name in cubes:
        packed, scale, s2 = mo[name], mo[f"{name}_weight_scale"], mo[f"{name}_weight_scale_2"]
        for e in range(packed.shape[0]):
            want = spec_dequantize(packed[e].t().contiguous(), scale[e].t().contiguous(), s2).t()
            assert torch.equal(dense[name][e], want.to(torch.bfloat16)), (name, e)


def test_torchrun_compressed_tensors_output_is_the_single_process_output(sharded_output, tmp_path):
    """Two ranks write the same files as one process, the exact-reciprocal record (gathered from the ranks
    that computed the scales) included."""
    import hashlib
    import os
    import subprocess
    import sys

    src, _ = sharded_output
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    trees = []
    for name, launcher in (("one", []), ("two", torchrun)):
        out = tmp_path / name
        args = ["--input_dir", str(src), "--output_dir", str(out), "--format", "compressed-tensors", "--quiet"]
        args += ["--max_shard_size", "30000", "--device", "cpu"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        cmd = [sys.executable, *launcher, "-m", "modelopt_streaming", "quantize", *args]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        trees.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()})
    assert trees[0] == trees[1]
    assert json.loads((tmp_path / "two" / "modelopt_streaming.json").read_text())["exact_reciprocals"]


def test_vllm_reads_our_compressed_tensors_ignore_exactly(tmp_path, vllm_python):
    """vLLM's own CompressedTensorsConfig, on each model class built as vLLM builds it (meta device): every
    layer it asks about is quantized exactly when our tensors are, fused and MoE layers included, and it
    refuses none (tests/vllm_oracle/ct_asked_layers.py)."""
    import subprocess

    cases = {
        "qwen3_moe": {},
        "deepseek_v3": {"mlp_only": True},
        "llama": {"exclude": ["model.layers.1.self_attn.*", "model.layers.0.mlp.down_proj"]},
    }
    dirs = []
    for arch, options in cases.items():
        src = make_model_checkpoint(tmp_path / arch / "src", arch, n_shards=2)
        quantize(src, tmp_path / arch / "ct", format="compressed-tensors", **options, **QUIET)
        dirs.append(tmp_path / arch / "ct")
    script = Path(__file__).parent / "vllm_oracle" / "ct_asked_layers.py"
    out = tmp_path / "asked.json"
    run = subprocess.run(
        [str(vllm_python), str(script), str(out), *map(str, dirs)], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    for ckpt in dirs:
        result = results[str(ckpt)]
        assert "error" not in result, result["error"]
        assert result["quantization"] == "compressed-tensors"
        packed = result["packed_modules_mapping"]
        names = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        quantized = {n[: -len(".weight_packed")] for n in names if n.endswith(".weight_packed")}
        kinds = set()
        for layer in result["layers"]:
            assert "error" not in layer, layer
            prefix = layer["prefix"]
            if layer["layer"] == "RoutedExperts":
                want = [n in quantized for n in layer["asked"]]
            else:
                parent, _, leaf = prefix.rpartition(".")
                members = [f"{parent}.{m}" for m in packed.get(leaf, [leaf])]
                states = {m in quantized for m in members}
                assert len(states) == 1, prefix
                want = states.pop()
            assert layer["quantized"] == want, (ckpt.parent.name, prefix)
            kinds.add((layer["layer"], str(want)))
        assert ("ParallelLMHead", "False") in kinds and any(w == "True" for _, w in kinds)
