"""GPTQ inside a calibrated quantize run (jobs/gptq.py, ``quantize_gptq``), judged with transformers' full model:
for every quantized Linear and every expert of tiny generated models, the output error on the inputs GPTQ was
solved on (the calibration rows through the already quantized earlier layers and the unquantized layer itself)
is below round-to-nearest's, with the same scales; experts with too few tokens keep round-to-nearest's bytes and
are reported; a run killed after any layer and resumed writes the same bytes."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checkpoints import load_dir
from engine_oracle import make_source, reference_model, token_rows
from forkrun import tree_hashes
from safetensors import safe_open
from safetensors.torch import save_file

import modelopt_streaming
from modelopt_streaming.codec import nvfp4
from modelopt_streaming.engine.hessian import is_fused_experts
from modelopt_streaming.jobs.gptq import PENDING_FILE, GptqSettings
from modelopt_streaming.jobs.quantize import quantize_gptq
from modelopt_streaming.validate import validate

_ROWS = dict(rows=8, length=32, seed=3)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _dequantized(out: dict, module: str) -> torch.Tensor:
    """The float32 weight [out, in] a ModelOpt-format Linear dequantizes to."""
    return nvfp4.dequantize(out[f"{module}.weight"], out[f"{module}.weight_scale"], out[f"{module}.weight_scale_2"])


def _dequantized_3d(out: dict, name: str) -> torch.Tensor:
    """The float32 fused experts [E, in, out] of a 3-D unit."""
    packed, scales, scale_2 = out[name], out[name + "_weight_scale"], out[name + "_weight_scale_2"]
    return torch.stack([nvfp4.dequantize(packed[e].t(), scales[e].t(), scale_2).t() for e in range(packed.shape[0])])


def _quantized_modules(out: dict) -> list[str]:
    return sorted(n[: -len(".weight_scale_2")] for n in out if n.endswith(".weight_scale_2"))


def _experts_3d(out: dict) -> list[str]:
    return sorted(n[: -len("_weight_scale_2")] for n in out if n.endswith("_weight_scale_2"))


def _load_quantized(model, out: dict, layers: range) -> None:
    """The dequantized weights of ``out`` into ``model``'s layers in ``layers`` (the model's own modules)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module in _quantized_modules(out):
            if int(module.split(".")[2]) not in layers:
                continue
            w = _dequantized(out, module)
            parts = module.split(".")
            if parts[-3] == "experts":  # a per-expert checkpoint Linear inside transformers' fused experts
                experts, e, leaf = ".".join(parts[:-2]), int(parts[-2]), parts[-1]
                if leaf in ("down_proj", "w2"):
                    params[f"{experts}.down_proj"][e].copy_(w)
                else:
                    fused = params[f"{experts}.gate_up_proj"][e]
                    rows = fused.shape[0] // 2
                    (fused[:rows] if leaf in ("gate_proj", "w1") else fused[rows:]).copy_(w)
            else:
                params[f"{module}.weight"].copy_(w)
        for name in _experts_3d(out):
            if int(name.split(".")[2]) in layers:
                params[name].copy_(_dequantized_3d(out, name))


def _inputs_of_layer(model, layer: int, ids: torch.Tensor) -> dict:
    """Each quantized Linear's inputs in decoder layer ``layer`` of ``model``, by checkpoint module name; each
    expert's (gate/up: its routed tokens; down: their ``act(gate) * up``) under (experts module, e, kind)."""
    inputs: dict = {}
    handles = []
    prefix = f"model.layers.{layer}."
    for path, mod in model.named_modules():
        if not path.startswith(prefix):
            continue
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_pre_hook(lambda _m, a, p=path: inputs.setdefault(p, []).append(a[0])))
        elif is_fused_experts(mod):

            def routed(m, args, p=path):
                hidden, index = args[0], args[1]
                mask = F.one_hot(index, num_classes=m.num_experts).permute(2, 1, 0)
                for e in range(m.num_experts):
                    _pos, tok = torch.where(mask[e])
                    x = hidden[tok]
                    transposed = getattr(m, "is_transposed", False)
                    gate_up = x @ m.gate_up_proj[e] if transposed else F.linear(x, m.gate_up_proj[e])
                    if getattr(m, "has_bias", False):
                        gate_up = gate_up + m.gate_up_proj_bias[e]
                    inputs.setdefault((p, e, "gate_up"), []).append(x)
                    inputs.setdefault((p, e, "down"), []).append(m._apply_gate(gate_up))

            handles.append(mod.register_forward_pre_hook(routed))
    with torch.no_grad():
        for row in ids.split(1):  # the engine's batch size
            model(row)
    for h in handles:
        h.remove()
    return {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]).float() for k, v in inputs.items()}


def _error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ q.T))


def _weight_bytes(out: dict, weight: str, scale: str, expert: int | None = None) -> tuple[bytes, bytes]:
    """The codes and the block scales of one weight (of one expert of a 3-D tensor), as bytes."""
    w, s = out[weight], _as_bits(out[scale])
    if expert is not None:
        w, s = w[expert], s[expert]
    return w.numpy().tobytes(), s.numpy().tobytes()


def _compare(src: Path, outs: dict, scales: str, ids: torch.Tensor, min_tokens: int, report: dict) -> tuple:
    """For every quantized Linear and expert (``outs``: the outputs of gptq, rtn and mse by name): GPTQ's output
    error below round-to-nearest's and not above its scales' own encoding (``base``: the output of the scales'
    ``--algorithm``, whose block scales it keeps); where the run
    found another encoding better (``report["gptq_not_better"]``), exactly that one's bytes, no worse than
    round-to-nearest's; an expert with fewer tokens than ``min_tokens``: mse's bytes. Global scales: round-to-
    nearest's. Returns (compared, kept, lost)."""
    ours, rtn, mse = outs["gptq"], outs["rtn"], outs["mse"]
    base = outs[scales]
    source = load_dir(src)
    model = reference_model(src)
    other = report["gptq_not_better"]
    compared = kept = 0
    lost: list[str] = []

    def check(name, x, w, g, r, b, bytes_of):
        nonlocal compared, kept
        if x is None or x.shape[0] < min_tokens:
            assert bytes_of(ours) == bytes_of(mse), name
            kept += 1
            return
        compared += 1
        e_g, e_r, e_b = _error(x, w, g), _error(x, w, r), _error(x, w, b)
        if name in other:
            lost.append(name)
            kept_as = other[name]
            if kept_as.startswith("gptq"):  # GPTQ over the other scales or in the other column order
                scales_of = rtn if "rtn_scales" in kept_as else base
                assert bytes_of(ours)[1] == bytes_of(scales_of)[1] and e_g < e_r, (name, e_g, e_r)
            else:
                assert bytes_of(ours) == bytes_of(rtn if kept_as == "rtn" else mse), name
                assert e_g <= e_r * (1 + 1e-5), name
        else:
            assert bytes_of(ours)[1] == bytes_of(base)[1], name  # the scales' block scales
            assert e_g < e_r and e_g <= e_b * (1 + 1e-5), (name, e_g, e_r, e_b)

    for layer in range(model.config.num_hidden_layers):
        _load_quantized(model, ours, range(layer))  # layers before: GPTQ's; this layer: the source's
        inputs = _inputs_of_layer(model, layer, ids)
        for module in _quantized_modules(ours):
            if not module.startswith(f"model.layers.{layer}."):
                continue
            parts = module.split(".")
            if parts[-3] == "experts":
                kind = "down" if parts[-1] in ("down_proj", "w2") else "gate_up"
                experts = ".".join(parts[:-2]).replace("block_sparse_moe", "mlp")
                x = inputs.get((experts, int(parts[-2]), kind))
            else:
                x = inputs[module]
            assert torch.equal(ours[f"{module}.weight_scale_2"], rtn[f"{module}.weight_scale_2"])
            bytes_of = functools.partial(_weight_bytes, weight=f"{module}.weight", scale=f"{module}.weight_scale")
            w = source[f"{module}.weight"].float()
            g, r, b = (_dequantized(o, module) for o in (ours, rtn, base))
            check(module, x, w, g, r, b, bytes_of)
        for name in _experts_3d(ours):
            if not name.startswith(f"model.layers.{layer}."):
                continue
            experts, leaf = name.rsplit(".", 1)
            w3 = source[name].float()
            g3, r3, b3 = (_dequantized_3d(o, name) for o in (ours, rtn, base))
            for e in range(w3.shape[0]):
                x = inputs.get((experts, e, "down" if leaf == "down_proj" else "gate_up"))
                bytes_of = functools.partial(_weight_bytes, weight=name, scale=f"{name}_weight_scale", expert=e)
                check(f"{name}[{e}]", x, w3[e].T, g3[e].T, r3[e].T, b3[e].T, bytes_of)
    return compared, kept, lost


def _runs(tmp_path, arch, settings: GptqSettings):
    src = make_source(tmp_path / "src", arch)
    ids = token_rows(256, **_ROWS)
    save_file({"input_ids": ids}, tmp_path / "rows.safetensors")
    common = dict(calib_data=tmp_path / "rows.safetensors", device="cpu", scale_math="cpu", progress="none")
    summary = quantize_gptq(src, tmp_path / "gptq", gptq=settings, **common)
    modelopt_streaming.quantize(src, tmp_path / "rtn", **common)
    modelopt_streaming.quantize(src, tmp_path / "mse", algorithm="mse", **common)
    return src, ids, summary


def _outputs(tmp_path) -> dict[str, dict]:
    return {d: load_dir(tmp_path / d) for d in ("gptq", "rtn", "mse")}


@pytest.mark.parametrize(
    "arch,act_order,scales",
    [
        ("llama", False, "mse"),
        ("qwen3_moe", False, "mse"),
        ("deepseek_v3", False, "mse"),
        ("gpt_oss", False, "mse"),
        ("llama", True, "mse"),
        ("llama", False, "rtn"),
    ],
)
def test_every_linear_beats_round_to_nearest_on_its_inputs(tmp_path, arch, act_order, scales):
    settings = GptqSettings(scales=scales, act_order=act_order, min_expert_tokens=16)
    src, ids, summary = _runs(tmp_path, arch, settings)
    report = summary.calibration["weights"]
    compared, kept, lost = _compare(src, _outputs(tmp_path), scales, ids, settings.min_expert_tokens, report)
    assert compared >= 8
    assert sorted(lost) == sorted(report["gptq_not_better"])
    # Every weight's codes are GPTQ's, over the settings' scales and order where they win, else over the other
    # scales or in the other order (the tiny Llama's layer-0 k_proj and v_proj, a minority).
    assert all(kept_as.startswith("gptq") for kept_as in report["gptq_not_better"].values()), report
    assert len(lost) <= compared // 5, report["gptq_not_better"]
    assert validate(tmp_path / "gptq").ok
    assert report["algorithm"] == "gptq" and report["act_order"] == act_order and report["scales"] == scales
    assert report["units_not_solved"] == []
    leaves = 2 if arch == "gpt_oss" else 3  # 3-D experts: gate_up and down; else gate, up and down
    assert sum(len(v) for v in report["experts_few_tokens_mse"].values()) * leaves == kept


def test_experts_with_few_tokens_take_mse_and_are_reported(tmp_path):
    settings = GptqSettings(scales="rtn", min_expert_tokens=120)
    src, ids, summary = _runs(tmp_path, "qwen3_moe", settings)
    tokens = summary.calibration["tokens_per_expert"]
    expected = {m: [e for e, n in enumerate(t) if n < 120] for m, t in tokens.items()}
    expected = {m: e for m, e in expected.items() if e}
    assert 0 < sum(map(len, expected.values())) < 8  # some experts fall back, not all
    assert summary.calibration["weights"]["experts_few_tokens_mse"] == expected
    outs = _outputs(tmp_path)
    ours, mse = outs["gptq"], outs["mse"]
    for module, experts in expected.items():
        for e in experts:
            for leaf in ("gate_proj", "up_proj", "down_proj"):
                name = f"{module}.{e}.{leaf}"
                assert torch.equal(ours[f"{name}.weight"], mse[f"{name}.weight"])  # mse's, not the rtn scales'
                assert torch.equal(_as_bits(ours[f"{name}.weight_scale"]), _as_bits(mse[f"{name}.weight_scale"]))
    _compare(src, outs, "rtn", ids, 120, summary.calibration["weights"])
    # The provenance keeps the report.
    import json

    record = json.loads((tmp_path / "gptq" / "modelopt_streaming.json").read_text())
    assert record["calibration"]["weights"]["experts_few_tokens_mse"] == expected


def test_expert_groups_and_experts_in_host_memory_give_the_same_bytes(tmp_path):
    src = make_source(tmp_path / "src", "qwen3_moe")
    save_file({"input_ids": token_rows(256, **_ROWS)}, tmp_path / "rows.safetensors")
    common = dict(calib_data=tmp_path / "rows.safetensors", device="cpu", progress="none")
    quantize_gptq(src, tmp_path / "whole", gptq=GptqSettings(min_expert_tokens=16), **common)
    one_by_one = GptqSettings(min_expert_tokens=16, expert_budget_bytes=1)
    quantize_gptq(src, tmp_path / "groups", gptq=one_by_one, **common)
    assert tree_hashes(tmp_path / "whole") == tree_hashes(tmp_path / "groups")
    # Experts kept in host memory (a layer over the device budget): solved from copies, written back in place.
    quantize_gptq(src, tmp_path / "host", gptq=GptqSettings(min_expert_tokens=16), calib_device_budget=1, **common)
    assert tree_hashes(tmp_path / "whole") == tree_hashes(tmp_path / "host")


def test_not_sequential_keeps_the_input_scales_of_the_unquantized_model(tmp_path):
    """``sequential=False``: every layer's inputs are the unquantized model's, so every input scale is round-to-
    nearest's calibrated value (ModelOpt's), while the weights are GPTQ's; sequential (the default) moves the
    input scales of the layers after the first."""
    src = make_source(tmp_path / "src", "qwen3_moe")
    save_file({"input_ids": token_rows(256, **_ROWS)}, tmp_path / "rows.safetensors")
    common = dict(calib_data=tmp_path / "rows.safetensors", device="cpu", progress="none")
    modelopt_streaming.quantize(src, tmp_path / "rtn", **common)
    quantize_gptq(src, tmp_path / "flat", gptq=GptqSettings(min_expert_tokens=16, sequential=False), **common)
    quantize_gptq(src, tmp_path / "seq", gptq=GptqSettings(min_expert_tokens=16), **common)
    rtn, flat, seq = (load_dir(tmp_path / d) for d in ("rtn", "flat", "seq"))
    inputs = [n for n in rtn if n.endswith("input_scale")]
    assert all(torch.equal(flat[n], rtn[n]) for n in inputs)
    assert any(not torch.equal(seq[n], rtn[n]) for n in inputs if ".layers.1." in n)
    assert all(torch.equal(seq[n], rtn[n]) for n in inputs if ".layers.0." in n)
    weights = [n for n in rtn if n.endswith(".weight") and rtn[n].dtype == torch.uint8]
    assert sum(not torch.equal(flat[n], rtn[n]) for n in weights) > len(weights) // 2
    # Layer 0 is solved on the same inputs either way.
    assert all(torch.equal(flat[n], seq[n]) for n in weights if ".layers.0." in n)


def test_gptq_is_refused_without_data(tmp_path):
    from modelopt_streaming.errors import UsageError

    src = make_source(tmp_path / "src", "llama")
    with pytest.raises(UsageError, match="needs --calib_data"):
        quantize_gptq(src, tmp_path / "out")
    with pytest.raises(UsageError, match="--gptq_scales must be one of mse, rtn"):
        GptqSettings(scales="max")


def _float32_source(tmp_path: Path) -> Path:
    from safetensors.torch import load_file

    src = make_source(tmp_path / "src", "llama")
    for shard in src.glob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    save_file({"input_ids": token_rows(256, **_ROWS)}, tmp_path / "rows.safetensors")
    return src


def test_gptq_of_a_float32_checkpoint_runs_it_in_float32(tmp_path):
    """A float32 checkpoint run in bf16 (the default) has its weights cast on loading: no solve would see them
    and every unit would be written unsolved without a word (found on a float32 SmolLM2). Refused before
    anything is written, naming the file, the tensor and ``--calib_dtype float32``, which solves them all."""
    from modelopt_streaming.errors import UsageError

    src = _float32_source(tmp_path)
    common = dict(calib_data=tmp_path / "rows.safetensors", device="cpu", progress="none")
    with pytest.raises(
        UsageError, match=r"safetensors, tensor '.*\.weight': --algorithm gptq .* read as float32: pass"
    ):
        quantize_gptq(src, tmp_path / "out", **common)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match=r"read as bfloat16: convert"):
        quantize_gptq(make_source(tmp_path / "bf16", "llama"), tmp_path / "out", calib_dtype="float32", **common)
    summary = quantize_gptq(src, tmp_path / "gptq", gptq=GptqSettings(scales="rtn"), calib_dtype="float32", **common)
    report = summary.calibration["weights"]
    assert report["units_not_solved"] == [] and summary.calibration["engine"]["dtype"] == "float32"
    modelopt_streaming.quantize(src, tmp_path / "rtn", calib_dtype="float32", **common)
    ours, rtn = load_dir(tmp_path / "gptq"), load_dir(tmp_path / "rtn")
    modules = _quantized_modules(ours)
    solved = [m for m in modules if report["gptq_not_better"].get(m) != "rtn"]
    assert len(solved) >= len(modules) - 1
    assert all(not torch.equal(ours[f"{m}.weight"], rtn[f"{m}.weight"]) for m in solved)
    # Layer 0's inputs, hence its input scales, are the float32 model's either way.
    assert all(torch.equal(ours[n], rtn[n]) for n in ours if n.startswith("model.layers.0.") and "input_scale" in n)


def test_gptq_weight_only_and_compressed_tensors(tmp_path):
    """W4A16 with --calib_data (the data drives the solve, no input scale is written) gives the W4A4 run's
    weights; the compressed-tensors dialect holds the ModelOpt run's codes and scales, and ``convert`` (the
    dialects' lossless bridge) turns it into the ModelOpt run's files byte for byte."""
    import filecmp

    src = make_source(tmp_path / "src", "qwen3_moe")
    save_file({"input_ids": token_rows(256, **_ROWS)}, tmp_path / "rows.safetensors")
    common = dict(calib_data=tmp_path / "rows.safetensors", device="cpu", progress="none")
    settings = GptqSettings(min_expert_tokens=16)
    quantize_gptq(src, tmp_path / "w4a4", gptq=settings, **common)
    quantize_gptq(src, tmp_path / "w4a16", gptq=settings, weight_only=True, **common)
    quantize_gptq(src, tmp_path / "ct", gptq=settings, format="compressed-tensors", **common)
    w4a4, w4a16 = load_dir(tmp_path / "w4a4"), load_dir(tmp_path / "w4a16")
    assert not any(n.endswith("input_scale") for n in w4a16)
    assert {n for n in w4a4 if not n.endswith("input_scale")} == set(w4a16)
    assert all(torch.equal(_as_bits(w4a4[n]), _as_bits(w4a16[n])) for n in w4a16)
    rtn = load_dir(modelopt_streaming.quantize(src, tmp_path / "rtn", weight_only=True, device="cpu").output_dir)
    assert sum(not torch.equal(w4a16[n], rtn[n]) for n in rtn if n.endswith(".weight")) > 10
    for d in ("w4a16", "ct"):
        assert validate(tmp_path / d).ok, d
    modelopt_streaming.convert(tmp_path / "ct", tmp_path / "back", "modelopt")
    names = [p.name for p in (tmp_path / "w4a4").iterdir() if p.suffix == ".safetensors"]
    names += ["config.json", "hf_quant_config.json", "model.safetensors.index.json"]
    assert all(filecmp.cmp(tmp_path / "w4a4" / n, tmp_path / "back" / n, shallow=False) for n in names)


_CHILD = """
import logging
import sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from modelopt_streaming.jobs.gptq import PENDING_FILE, GptqSettings
from modelopt_streaming.jobs.quantize import quantize_gptq
src, rows, out, resume, form = sys.argv[1:6]
extra = dict(kv_cache="fp8") if form == "modelopt" else {}
quantize_gptq(src, out, gptq=GptqSettings(min_expert_tokens=16), calib_data=rows, device="cpu", progress="log",
              max_shard_size=40_000, resume=resume == "1", format=form, **extra)
"""


def _child(src, rows, out, resume: bool, env: dict, form: str = "modelopt") -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MODELOPT_STREAMING_FAULT")}
    environ.update(env, MODELOPT_STREAMING_CALIBRATION_CHECKPOINT_S="0")
    args = [sys.executable, "-c", _CHILD, str(src), str(rows), str(out), "1" if resume else "0", form]
    return subprocess.run(args, capture_output=True, text=True, env=environ, check=False)


@pytest.mark.slow
def test_killed_at_a_layer_boundary_then_resumed_is_byte_identical(tmp_path):
    """Killed after the middle layer (the compressed-tensors test kills after the first; the calibration's own
    tests kill while the stream writes after it); the resumed run writes the bytes of an uninterrupted one."""
    src = make_source(tmp_path / "src", "deepseek_v3")  # 3 decoder layers, MLA, shared and routed experts
    rows = tmp_path / "rows.safetensors"
    save_file({"input_ids": token_rows(256, **_ROWS)}, rows)
    r = _child(src, rows, tmp_path / "reference", False, {})
    assert r.returncode == 0, r.stderr
    reference = tree_hashes(tmp_path / "reference")
    assert sum(n.startswith("model-") for n in reference) >= 3  # several shards: some finish mid-calibration
    kept = []
    for k in (2,):
        out = tmp_path / f"k{k}"
        killed = _child(src, rows, out, False, {"MODELOPT_STREAMING_FAULT": f"layer:{k}"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        with safe_open(out / ".modelopt_streaming" / "calibration" / "rank0" / PENDING_FILE, "pt") as f:
            kept.append(len(f.keys()))
        resumed = _child(src, rows, out, True, {})
        assert resumed.returncode == 0, resumed.stderr
        assert f"calibrate: resuming after layer {k}" in resumed.stderr, resumed.stderr
        assert tree_hashes(out) == reference, f"layer:{k}"
    assert any(kept)  # a resumed run wrote units of layers before its boundary from the kept encodings


def test_compressed_tensors_killed_after_a_layer_then_resumed_is_byte_identical(tmp_path):
    """The kept encodings carry the dialect's exact-reciprocal records with them (the shards' records need them,
    and a resumed run writes those units without encoding them again)."""
    src = make_source(tmp_path / "src", "llama")
    rows = tmp_path / "rows.safetensors"
    save_file({"input_ids": token_rows(256, **_ROWS)}, rows)
    r = _child(src, rows, tmp_path / "reference", False, {}, "compressed-tensors")
    assert r.returncode == 0, r.stderr
    killed = _child(src, rows, tmp_path / "k", False, {"MODELOPT_STREAMING_FAULT": "layer:1"}, "compressed-tensors")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with safe_open(tmp_path / "k" / ".modelopt_streaming" / "calibration" / "rank0" / PENDING_FILE, "pt") as f:
        assert len(f.keys()) > 0
    resumed = _child(src, rows, tmp_path / "k", True, {}, "compressed-tensors")
    assert resumed.returncode == 0, resumed.stderr
    assert "calibrate: resuming after layer 1" in resumed.stderr, resumed.stderr
    assert tree_hashes(tmp_path / "k") == tree_hashes(tmp_path / "reference")


_RANKED = """
import sys
from modelopt_streaming.jobs.gptq import GptqSettings
from modelopt_streaming.jobs.quantize import init_distributed, quantize_gptq
src, rows, out, batch = sys.argv[1:5]
device, _ = init_distributed("cpu")
quantize_gptq(src, out, gptq=GptqSettings(min_expert_tokens=16), calib_data=rows, device=device, progress="none",
              max_shard_size=40_000, kv_cache="fp8", calib_batch_size=int(batch))
"""

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow
@pytest.mark.parametrize("arch,batch", [("deepseek_v3", 2)])
def test_two_ranks_write_the_bytes_of_one_process(tmp_path, arch, batch):
    """Every rank runs every row (the Hessians are those of one process), the ranks split each layer's solves and
    exchange the codes, each writes the units it solved."""
    src = make_source(tmp_path / "src", arch)
    rows = tmp_path / "rows.safetensors"
    save_file({"input_ids": token_rows(256, **_ROWS)}, rows)
    script = tmp_path / "child.py"
    script.write_text(_RANKED)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("MODELOPT_STREAMING_")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for out, launcher in (("one", [sys.executable]), ("two", torchrun)):
        args = [*launcher, str(script), str(src), str(rows), str(tmp_path / out), str(batch)]
        r = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
    assert tree_hashes(tmp_path / "two") == tree_hashes(tmp_path / "one")


def test_the_command_line_runs_gptq_and_reports_it(tmp_path, capsys):
    """``quantize --algorithm gptq --calib_data`` with ``--gptq_*`` settings: the bytes of ``quantize_gptq`` with
    those settings, the algorithm and its settings in the summary, ``--json`` and the provenance; without data,
    or ``--gptq_*`` without ``--algorithm gptq``, it is refused."""
    import json

    src = make_source(tmp_path / "src", "qwen3_moe")
    save_file({"input_ids": token_rows(256, **_ROWS)}, tmp_path / "rows.safetensors")
    base = ["--input_dir", src, "--device", "cpu", "--algorithm", "gptq"]

    def cli(*args):
        cmd = [sys.executable, "-m", "modelopt_streaming", "quantize", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    settings = ["--gptq_scales", "rtn", "--gptq_min_expert_tokens", "16", "--gptq_damp", "0.02"]
    r = cli(*base, "--output_dir", tmp_path / "cli", "--calib_data", tmp_path / "rows.safetensors", *settings, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["algorithm"] == "gptq"
    assert report["algorithm_settings"]["min_expert_tokens"] == 16 and report["algorithm_settings"]["scales"] == "rtn"
    assert report["calibration"]["weights"]["algorithm"] == "gptq"
    gptq = GptqSettings(scales="rtn", min_expert_tokens=16, damp=0.02)
    quantize_gptq(src, tmp_path / "api", gptq=gptq, calib_data=tmp_path / "rows.safetensors", device="cpu")
    assert tree_hashes(tmp_path / "cli") == tree_hashes(tmp_path / "api")
    record = json.loads((tmp_path / "cli" / "modelopt_streaming.json").read_text())
    assert record["options"]["algorithm_settings"]["damp"] == 0.02
    # Refusals, in this process (the same entry point as the command).
    from modelopt_streaming import cli as command

    assert command.main(["quantize", *map(str, base), "--output_dir", str(tmp_path / "x")]) == 2
    assert "needs --calib_data" in capsys.readouterr().err
    assert (
        command.main(["quantize", "--input_dir", str(src), "--output_dir", str(tmp_path / "y"), "--gptq_natural_order"])
        == 2
    )
    assert "need --algorithm gptq" in capsys.readouterr().err
