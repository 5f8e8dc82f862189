"""``evaluate``: its figures equal an independent computation with transformers' full model (every NVFP4 weight
replaced by its dequantized value, and for W4A4 the inputs quantize-dequantized as vLLM's emulation does, written
here from vLLM's code without the engine); the same bytes from ModelOpt and from us give the same figures; a
scrambled layer is the one where the error jumps; bad input is a one-line error."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import load_dir
from engine_oracle import make_source, token_rows
from safetensors.torch import save_file

import modelopt_streaming
from modelopt_streaming.errors import CheckpointError, UsageError

FIGURES = ("kl_mean", "kl_p99", "top1_agree", "ppl", "source_ppl")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


# --- the oracle: no engine code below this line until the tests ---------------------------------------------


def _unpack(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """E2M1 values of codes packed two to a byte along ``dim`` (element 2j in the low nibble)."""
    low, high = E2M1[(packed & 0x0F).long()], E2M1[(packed >> 4).long()]
    both = torch.stack([low, high], dim=dim + 1)
    shape = list(packed.shape)
    shape[dim] *= 2
    return both.reshape(shape)


def dequantized_tensors(q: dict[str, torch.Tensor], fmt: str) -> tuple[dict, dict]:
    """Every tensor of an NVFP4 checkpoint under the source's names, NVFP4 weights dequantized to bf16 (codes x
    (block scale x global scale) in float32, vLLM's ``dequantize_to_dtype`` order), and the input scale
    (ModelOpt's sense) of each quantized weight."""
    out, inputs, used = {}, {}, set()
    packed_leaf = "weight" if fmt == "modelopt" else "weight_packed"
    for name, t in q.items():
        module, _, leaf = name.rpartition(".")
        if leaf == packed_leaf and t.dtype == torch.uint8 and t.dim() == 2:
            scale = q[f"{module}.weight_scale"].float().repeat_interleave(16, dim=1)
            if fmt == "modelopt":
                g, inp = q[f"{module}.weight_scale_2"].float(), q.get(f"{module}.input_scale")
            else:
                g, inp = 1.0 / q[f"{module}.weight_global_scale"].float(), q.get(f"{module}.input_global_scale")
                inp = None if inp is None else 1.0 / inp.float()
            out[f"{module}.weight"] = (_unpack(t, 1) * (scale * g.reshape(()))).to(torch.bfloat16)
            used |= {name, f"{module}.weight_scale", f"{module}.weight_scale_2", f"{module}.weight_global_scale"}
            used |= {f"{module}.input_scale", f"{module}.input_global_scale"}
            if inp is not None:
                inputs[f"{module}.weight"] = inp.float().reshape(())
        elif t.dtype == torch.uint8 and t.dim() == 3 and f"{name}_weight_scale" in q:
            scale = q[f"{name}_weight_scale"].float().repeat_interleave(16, dim=1)
            g = q[f"{name}_weight_scale_2"].float().reshape(())
            out[name] = (_unpack(t, 1) * (scale * g)).to(torch.bfloat16)
            used |= {name, f"{name}_weight_scale", f"{name}_weight_scale_2", f"{name}_input_scale"}
            if f"{name}_input_scale" in q:
                inputs[name] = q[f"{name}_input_scale"].float().reshape(())
    out.update({n: t for n, t in q.items() if n not in used and n not in out})
    return out, inputs


def vllm_quant_dequant(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """vLLM 0.32 ``nvfp4_emulation_utils.ref_nvfp4_quant_dequant`` (CPU path), transcribed."""

    def get_reciprocal(x):
        return 1.0 / (x + (x == 0) * 1e8)

    def cast_to_fp4(x):
        sign = torch.sign(x)
        x = torch.abs(x)
        x[(x >= 0.0) & (x <= 0.25)] = 0.0
        x[(x > 0.25) & (x < 0.75)] = 0.5
        x[(x >= 0.75) & (x <= 1.25)] = 1.0
        x[(x > 1.25) & (x < 1.75)] = 1.5
        x[(x >= 1.75) & (x <= 2.5)] = 2.0
        x[(x > 2.5) & (x < 3.5)] = 3.0
        x[(x >= 3.5) & (x <= 5.0)] = 4.0
        x[x > 5.0] = 6.0
        return x * sign

    shape, dtype = x.shape, x.dtype
    x = x.reshape(-1, shape[-1])
    m, n = x.shape
    xb = torch.reshape(x, (m, n // 16, 16))
    vec_max = torch.max(torch.abs(xb), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = global_scale * (vec_max * (1 / 6.0))
    scale = torch.clamp(scale, max=448, min=-448).to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = get_reciprocal(scale * get_reciprocal(global_scale))
    scaled_x = xb.to(torch.float32) * output_scale
    x_fp4 = cast_to_fp4(torch.clamp(scaled_x, -6.0, 6.0).reshape(m, n)).reshape(m, n // 16, 16)
    return (x_fp4 * (scale.squeeze(-1).unsqueeze(-1) / global_scale)).reshape(shape).to(dtype)


def _oracle_experts(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop with each expert's inputs quantize-dequantized (vLLM's emulated MoE)."""
    gs13, gs2 = self._oracle_gs
    out = torch.zeros_like(hidden_states)
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        e = e[0]
        pos, tok = torch.where(mask[e])
        x = vllm_quant_dequant(hidden_states[tok], gs13)
        t = getattr(self, "is_transposed", False)
        gu = x @ self.gate_up_proj[e] if t else torch.nn.functional.linear(x, self.gate_up_proj[e])
        if getattr(self, "has_bias", False):
            gu = gu + self.gate_up_proj_bias[e]
        h = vllm_quant_dequant(self._apply_gate(gu), gs2)
        h = h @ self.down_proj[e] if t else torch.nn.functional.linear(h, self.down_proj[e])
        if getattr(self, "has_bias", False):
            h = h + self.down_proj_bias[e]
        out.index_add_(0, tok, (h * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def oracle_figures(src: Path, qdir: Path, ids: torch.Tensor, tmp: Path, w4a4: bool, fmt: str = "modelopt") -> dict:
    """KL, top-1 and perplexities from transformers' full models, one row per forward as the engine runs."""
    import transformers as tf
    from transformers.integrations.moe import ExpertsInterface

    tensors, inputs = dequantized_tensors(load_dir(qdir), fmt)
    deq = tmp / "dequantized"
    deq.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, deq / "model.safetensors")
    shutil.copy(src / "config.json", deq / "config.json")
    load = dict(dtype=torch.bfloat16, experts_implementation="eager")
    ref = tf.AutoModelForCausalLM.from_pretrained(src, **load).eval()
    model = tf.AutoModelForCausalLM.from_pretrained(deq, **load).eval()
    if w4a4:
        ExpertsInterface.register("oracle_nvfp4", _oracle_experts)
        for name, mod in model.named_modules():
            key = name.replace(".mlp.", ".block_sparse_moe.") if "mixtral" in model.config.model_type else name
            if isinstance(mod, torch.nn.Linear) and f"{key}.weight" in inputs:
                gs = (1.0 / inputs[f"{key}.weight"]).to(torch.float32)
                mod.register_forward_pre_hook(lambda _m, a, gs=gs: (vllm_quant_dequant(a[0], gs), *a[1:]))
            elif hasattr(mod, "gate_up_proj") and hasattr(mod, "num_experts"):
                gu = [v for k, v in inputs.items() if k.startswith(f"{name}.") and "down" not in k]
                dn = [v for k, v in inputs.items() if k.startswith(f"{name}.") and "down" in k]
                mod._oracle_gs = (1.0 / torch.stack(gu).max(), 1.0 / torch.stack(dn).max())
                mod.config._experts_implementation = "oracle_nvfp4"
    kls, agree, nll_s, nll_q, n = [], 0, 0.0, 0.0, 0
    with torch.no_grad():
        for row in ids:
            ls, lq = ref(row[None]).logits.float(), model(row[None]).logits.float()
            ps, pq = torch.log_softmax(ls, -1), torch.log_softmax(lq, -1)
            kls.append((ps.exp() * (ps - pq)).sum(-1).reshape(-1).double())
            agree += int((ls.argmax(-1) == lq.argmax(-1)).sum())
            nll_s -= float(ps[0, :-1].gather(-1, row[1:, None]).double().sum())
            nll_q -= float(pq[0, :-1].gather(-1, row[1:, None]).double().sum())
            n += len(row) - 1
    kl = torch.cat(kls)
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "top1_agree": agree / kl.numel(),
        "ppl": math.exp(nll_q / n),
        "source_ppl": math.exp(nll_s / n),
    }


# --- the tests ----------------------------------------------------------------------------------------------


def _close(ours: dict, theirs: dict, rel: float = 1e-4) -> None:
    for key in FIGURES:
        a, b = ours[key], theirs[key]
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-9), (key, a, b)


def _quantized(tmp_path: Path, src: Path, rows: Path, w4a4: bool, **kw) -> Path:
    out = tmp_path / ("w4a4" if w4a4 else "w4a16")
    if w4a4:
        modelopt_streaming.quantize(src, out, calib_data=rows, device="cpu", **kw)
    else:
        modelopt_streaming.quantize(src, out, weight_only=True, device="cpu", **kw)
    return out


def _rows(tmp_path: Path, n: int = 2, length: int = 16) -> tuple[Path, torch.Tensor]:
    ids = token_rows(256, rows=n, length=length)
    save_file({"input_ids": ids}, tmp_path / "rows.safetensors")
    return tmp_path / "rows.safetensors", ids


def _evaluate(src, q, data, **kw):
    return modelopt_streaming.evaluate(src, q, data=data, device="cpu", progress="none", **kw)


@pytest.mark.parametrize("w4a4", [False, True], ids=["w4a16", "w4a4"])
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_figures_equal_the_full_model_with_dequantized_weights(tmp_path, arch, w4a4):
    src = make_source(tmp_path / "src", arch)
    data, ids = _rows(tmp_path)
    q = _quantized(tmp_path, src, data, w4a4)
    report = _evaluate(src, q, data)
    assert report.checkpoint["act_quant"] is w4a4
    theirs = oracle_figures(src, q, ids, tmp_path, w4a4)
    _close(report.as_dict(), theirs)
    # The source side is transformers' own forward: its perplexity is the full model's to the last bits.
    assert math.isclose(report.source_ppl, theirs["source_ppl"], rel_tol=1e-12)
    assert report.kl_mean > 0 and 0 < report.top1_agree <= 1
    assert len(report.layers) == json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert report.embed_rel_error == 0.0  # the embedding is left unquantized and read from the checkpoint


def test_compressed_tensors_dialect_equals_the_oracle(tmp_path):
    src = make_source(tmp_path / "src", "qwen3_moe")
    data, ids = _rows(tmp_path)
    q = _quantized(tmp_path, src, data, True, format="compressed-tensors")
    report = _evaluate(src, q, data)
    assert report.checkpoint["format"] == "compressed-tensors" and report.checkpoint["act_quant"]
    _close(report.as_dict(), oracle_figures(src, q, ids, tmp_path, True, fmt="compressed-tensors"))


def test_modelopt_export_and_ours_give_the_same_figures(tmp_path):
    from test_calibration_modelopt import modelopt_calibrated_export

    src = make_source(tmp_path / "src", "llama")
    data, ids = _rows(tmp_path)
    modelopt_calibrated_export(src, tmp_path / "modelopt", ids, kv=False)
    modelopt_streaming.quantize(src, tmp_path / "ours", calib_data=data, scale_math="cpu", device="cpu")
    ref, ours = load_dir(tmp_path / "modelopt"), load_dir(tmp_path / "ours")
    assert all(torch.equal(ref[n].view(torch.uint8), ours[n].view(torch.uint8)) for n in ref if ref[n].dim())
    a, b = _evaluate(src, tmp_path / "modelopt", data), _evaluate(src, tmp_path / "ours", data)
    assert a.checkpoint["act_quant"] and b.checkpoint["act_quant"]
    assert {k: a.as_dict()[k] for k in (*FIGURES, "layers")} == {k: b.as_dict()[k] for k in (*FIGURES, "layers")}


def test_a_scrambled_layer_is_where_the_error_jumps(tmp_path):
    from safetensors.torch import load_file

    src = make_source(tmp_path / "src", "deepseek_v3")
    data, _ = _rows(tmp_path)
    q = _quantized(tmp_path, src, data, False)
    clean = _evaluate(src, q, data)
    bad = tmp_path / "scrambled"
    shutil.copytree(q, bad)
    gen = torch.Generator().manual_seed(0)
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.startswith("model.layers.1.") and t.dtype == torch.uint8:
                tensors[name] = torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=gen)
        save_file(tensors, shard, metadata={"format": "pt"})
    scrambled = _evaluate(src, bad, data)
    assert scrambled.layers[0] == clean.layers[0]
    assert scrambled.layers[1] > 3 * clean.layers[1], (clean.layers, scrambled.layers)
    assert scrambled.worst_jump() == 1
    assert scrambled.kl_mean > clean.kl_mean


def _rewrite(qdir: Path, change) -> None:
    from safetensors.torch import load_file

    for shard in qdir.glob("*.safetensors"):
        tensors = load_file(shard)
        change(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    index = qdir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        present = {n for s in qdir.glob("*.safetensors") for n in load_file(s)}
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in present}
        index.write_text(json.dumps(data))


def test_bad_input_is_a_clear_error(tmp_path):
    src = make_source(tmp_path / "src", "llama")
    data, _ = _rows(tmp_path)
    q = _quantized(tmp_path, src, data, False)
    with pytest.raises(UsageError, match="not an NVFP4 checkpoint"):
        _evaluate(src, src, data)
    with pytest.raises(CheckpointError, match="has no input scale"):
        _evaluate(src, q, data, act_quant="on")

    missing = tmp_path / "missing"
    shutil.copytree(q, missing)
    _rewrite(missing, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight", None))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.post_attention_layernorm\.weight' is missing"):
        _evaluate(src, missing, data)

    shaped = tmp_path / "shaped"
    shutil.copytree(q, shaped)

    def narrow(t):
        name = "model.layers.0.mlp.down_proj.weight"
        if name in t:
            t[name] = t[name][:, :-8].contiguous()
            scale = "model.layers.0.mlp.down_proj.weight_scale"
            t[scale] = t[scale][:, :-1].contiguous()

    _rewrite(shaped, narrow)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight'.*shape"):
        _evaluate(src, shaped, data)

    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="--data .*empty.jsonl: no records"):
        _evaluate(src, q, tmp_path / "empty.jsonl")
    save_file({"input_ids": torch.zeros(0, 16, dtype=torch.int64)}, tmp_path / "none.safetensors")
    with pytest.raises(UsageError, match="no tokens"):
        _evaluate(src, q, tmp_path / "none.safetensors")

    r = subprocess.run(
        [sys.executable, "-m", "modelopt_streaming", "evaluate", "--source", str(src), "--checkpoint", str(src)],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not an NVFP4 checkpoint" in lines[0], r.stderr


def _word_tokenizer(directory: Path, text: str, size: int = 256) -> None:
    """A word-level tokenizer over the text's most frequent words (ids below ``size``)."""
    import collections
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = collections.Counter(re.findall(r"\w+|[^\w\s]", text)).most_common(size - 2)
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, (w, _) in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(directory)


# sha256 of the evaluation text the package ships (modelopt_streaming/jobs/evaldata/newton-opticks.txt).
TEXT_SHA256 = "d4a9ac22462b35e7821a4f2706c211093da678620a8f9997989ee7cf8d507bbd"


def test_the_command_line_reports_on_the_shipped_text_with_a_plot(tmp_path):
    from modelopt_streaming.jobs.evaluate import default_text_path

    text = default_text_path()
    assert hashlib.sha256(text.read_bytes()).hexdigest() == TEXT_SHA256
    assert len(text.read_bytes()) > 300_000 and text.read_text().count(" the ") > 5000  # real prose
    src = make_source(tmp_path / "src", "qwen3_moe")
    _word_tokenizer(src, text.read_text())
    data, _ = _rows(tmp_path)
    q = _quantized(tmp_path, src, data, True)
    args = ["--source", src, "--checkpoint", q, "--samples", "2", "--seq_len", "32", "--device", "cpu"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelopt_streaming",
            "evaluate",
            *map(str, args),
            "--json",
            "--plot",
            tmp_path / "e.png",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert {"kl_mean", "kl_p99", "top1_agree", "ppl", "source_ppl", "layers"} <= set(report)
    assert report["data"]["file_sha256"] == TEXT_SHA256 and "Opticks" in report["data"]["name"]
    assert report["data"]["rows"] == 2 and report["data"]["seq_len"] == 32
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same rows through the API give the same figures; float32 measures the quantization's error alone.
    api = _evaluate(src, q, None, samples=2, seq_len=32)
    assert [api.as_dict()[k] for k in FIGURES] == [report[k] for k in FIGURES]
    f32 = _evaluate(src, q, None, samples=2, seq_len=32, dtype="float32")
    assert f32.engine["dtype"] == "float32" and f32.source_ppl != api.source_ppl and f32.kl_mean > 0
    # Text lines on the terminal: the figures and the per-layer errors.
    r = subprocess.run(
        [sys.executable, "-m", "modelopt_streaming", "evaluate", *map(str, args)], capture_output=True, text=True
    )
    assert r.returncode == 0 and "top-1 agreement" in r.stdout and "layer   1" in r.stdout, r.stderr


def test_a_compressed_tensors_nvfp4a16_checkpoint_of_another_producer(tmp_path):
    """compressed-tensors' own NVFP4 compressor (every Linear on its own global scale, as llm-compressor's
    model-free path writes it), weight-only. vLLM runs each fused q/k/v and gate/up with one global scale, from
    the largest stored divisor (compressed_tensors_w4a4_nvfp4.py, also for NVFP4A16), so the figures equal the
    oracle's on that checkpoint with the collapsed divisor written into every member, and the report names
    the members whose own scale was not used."""
    from checkpoints import compressed_tensors_nvfp4a16

    src = make_source(tmp_path / "src", "llama")
    data, ids = _rows(tmp_path)
    q = compressed_tensors_nvfp4a16(src, tmp_path / "ct")
    report = _evaluate(src, q, data)
    assert report.checkpoint["format"] == "compressed-tensors" and report.checkpoint["act_quant"] is False
    groups = [
        [f"model.layers.{i}.{m}" for m in members]
        for i in range(2)
        for members in (
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["mlp.gate_proj", "mlp.up_proj"],
        )
    ]
    original = load_dir(q)

    def collapse(tensors: dict) -> None:
        for members in groups:
            value = torch.stack([original[f"{m}.weight_global_scale"] for m in members]).max()
            for m in members:
                key = f"{m}.weight_global_scale"
                if key in tensors:  # this shard's
                    tensors[key] = value.reshape(tensors[key].shape).clone()

    collapsed = tmp_path / "collapsed"
    shutil.copytree(q, collapsed)
    _rewrite(collapsed, collapse)
    differing = sorted(
        f"{m}.weight"
        for members in groups
        for m in members
        if not torch.equal(original[f"{m}.weight_global_scale"], load_dir(collapsed)[f"{m}.weight_global_scale"])
    )
    assert differing and report.checkpoint["scales_collapsed_by_vllm"] == differing
    (tmp_path / "oracle").mkdir()
    _close(report.as_dict(), oracle_figures(src, collapsed, ids, tmp_path / "oracle", False, fmt="compressed-tensors"))
    assert _evaluate(src, collapsed, data).checkpoint["scales_collapsed_by_vllm"] == []


def test_hidden_states_spilled_to_a_file_give_the_same_figures(tmp_path):
    """Every hidden-state store in a memory-mapped file (host budget 0) gives the figures of the in-memory run."""
    src = make_source(tmp_path / "src", "qwen3_moe")
    data, _ids = _rows(tmp_path, n=3)
    q = _quantized(tmp_path, src, data, w4a4=True)
    memory = _evaluate(src, q, data, batch_size=2).as_dict()
    spilled = _evaluate(src, q, data, batch_size=2, host_budget_bytes=0).as_dict()
    assert {k: memory[k] for k in (*FIGURES, "layers")} == {k: spilled[k] for k in (*FIGURES, "layers")}


def _vllm_collapsed(tensors: dict, groups: list[tuple[list[str], str]]) -> None:
    """Write into every member of each group the scale vLLM 0.32 runs it with: of a fused linear the largest
    ``weight_scale_2`` and ``input_scale`` of its members (modelopt.py ``KNvfp4Static.process``); of an expert's
    gate and up the gate's ``weight_scale_2`` (``w13_weight_scale_2[:, 0]``)."""
    for members, rule in groups:
        leaves = ("weight_scale_2",) if rule == "gate" else ("weight_scale_2", "input_scale")
        for leaf in leaves:
            values = [tensors[f"{m}.{leaf}"] for m in members]
            value = values[0] if rule == "gate" else torch.stack(values).max()
            for m in members:
                tensors[f"{m}.{leaf}"] = value.clone()


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_fused_members_with_their_own_scales_run_as_vllm_runs_them(tmp_path, arch):
    """A producer that gave q/k/v (or gate/up) different global and input scales, or an expert's up projection
    another global scale than its gate: vLLM collapses them (the group's max for a fused linear, the gate's
    for w13), so evaluate measures the checkpoint with the collapsed scales written in, not member by member."""
    src = make_source(tmp_path / "src", arch)
    data, ids = _rows(tmp_path)
    q = _quantized(tmp_path, src, data, w4a4=True)
    prefix = "model.layers.0"
    groups = [([f"{prefix}.self_attn.{m}_proj" for m in "qkv"], "max")]
    if arch == "llama":
        groups.append(([f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], "max"))
    else:
        groups.append(([f"{prefix}.mlp.experts.1.gate_proj", f"{prefix}.mlp.experts.1.up_proj"], "gate"))

    def disturb(tensors: dict) -> None:
        for members, _rule in groups:
            name = members[-1]
            if f"{name}.weight_scale_2" in tensors:
                tensors[f"{name}.weight_scale_2"] = tensors[f"{name}.weight_scale_2"] * 1.75
                tensors[f"{name}.input_scale"] = tensors[f"{name}.input_scale"] * 2.5

    disturbed, collapsed = tmp_path / "disturbed", tmp_path / "collapsed"
    shutil.copytree(q, disturbed)
    _rewrite(disturbed, disturb)
    shutil.copytree(disturbed, collapsed)
    _rewrite(collapsed, lambda t: _vllm_collapsed(t, groups))
    a, b = _evaluate(src, disturbed, data).as_dict(), _evaluate(src, collapsed, data).as_dict()
    assert {k: a[k] for k in (*FIGURES, "layers")} == {k: b[k] for k in (*FIGURES, "layers")}
    before = _evaluate(src, q, data).as_dict()
    assert before["layers"][0] != a["layers"][0]  # the disturbance is measured
    _close(a, oracle_figures(src, collapsed, ids, tmp_path, w4a4=True))


_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow
def test_torchrun_ranks_split_the_rows_and_report_one_process_figures(tmp_path):
    """``torchrun --nproc-per-node 2 modelopt-streaming evaluate``: each rank runs every other batch (5 rows in
    batches of 2: rank 0 runs two, rank 1 one), the ranks exchange each batch's terms and add them in batch
    order, so every figure equals a single process's bit for bit; rank 0 alone prints."""
    src = make_source(tmp_path / "src", "qwen3_moe")
    q = tmp_path / "q"
    modelopt_streaming.quantize(src, q, device="cpu", progress="none")
    save_file({"input_ids": token_rows(256, rows=5, length=24, seed=11)}, tmp_path / "rows.safetensors")
    args = ["-m", "modelopt_streaming", "evaluate", "--source", src, "--checkpoint", q, "--device", "cpu"]
    args += ["--data", tmp_path / "rows.safetensors", "--batch_size", "2", "--act_quant", "on", "--json"]
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("MODELOPT_STREAMING_")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run([*torchrun, *map(str, args)], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"kl_mean"') == 1, r.stdout  # one report: rank 0's
    two = json.loads(r.stdout[r.stdout.index("{") :])
    one = modelopt_streaming.evaluate(
        src, q, data=tmp_path / "rows.safetensors", batch_size=2, act_quant="on", device="cpu", progress="none"
    ).as_dict()
    assert (one["engine"].pop("ranks"), two["engine"].pop("ranks")) == (1, 2)
    one, two = ({k: v for k, v in rep.items() if k != "seconds"} for rep in (one, two))
    assert json.loads(json.dumps(one)) == two
    assert one["tokens"] == 5 * 24 and one["kl_mean"] > 0
