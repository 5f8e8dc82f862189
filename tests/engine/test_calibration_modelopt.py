"""The engine's max calibration against NVIDIA ModelOpt's own: ``mtq.quantize`` with NVFP4_DEFAULT_CFG plus the
data-calibrated FP8 KV-cache config, fed the same rows one at a time, then ``export_hf_checkpoint`` on the CPU.
Every ``input_scale``, ``k_scale`` and ``v_scale`` it writes equals ours bit for bit, under the same names."""

from __future__ import annotations

import pytest
import torch
from checkpoints import load_dir
from engine_oracle import ARCHS, make_source, token_rows

from modelopt_streaming.engine.calibrate import calibrate
from modelopt_streaming.engine.runner import EngineOptions
from modelopt_streaming.source.index import build_index
from modelopt_streaming.source.reader import TensorReader


def modelopt_calibrated_export(src, out, rows: torch.Tensor, kv: bool = True, dtype: torch.dtype = torch.bfloat16):
    import modelopt.torch.quantization as mtq
    import transformers as tf
    from modelopt.torch.export import export_hf_checkpoint

    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    kv_cfg = list(mtq.FP8_KV_CFG["quant_cfg"]) if kv else []
    config = {**mtq.NVFP4_DEFAULT_CFG, "quant_cfg": list(mtq.NVFP4_DEFAULT_CFG["quant_cfg"]) + kv_cfg}

    def forward_loop(m):
        for row in rows:
            m(row[None])

    mtq.quantize(model, config, forward_loop)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    return load_dir(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_scales_equal_modelopt(tmp_path, arch):
    src = make_source(tmp_path / "src", arch)
    rows = token_rows(256, rows=3)
    ref = modelopt_calibrated_export(src, tmp_path / "modelopt", rows)
    with TensorReader(src) as reader:
        ours = calibrate(build_index(src), reader, rows, EngineOptions(), kv=True)
    compared = 0
    for name, value in sorted(ref.items()):
        if name.endswith("input_scale"):
            module = name[: -len(".input_scale")] if name.endswith(".input_scale") else name[: -len("_input_scale")]
            amax, divisor = ours.input_amax[module], 6 * 448
        elif name.endswith((".k_proj.k_scale", ".v_proj.v_scale")):
            attention = name.rsplit(".", 2)[0]
            amax, divisor = ours.kv_amax[attention][0 if name.endswith("k_scale") else 1], 448
        else:
            continue
        # ModelOpt's CPU export divides in float32 (its CUDA export multiplies by the reciprocal).
        assert torch.equal(torch.tensor(amax, dtype=torch.float32) / divisor, value), name
        compared += 1
    assert compared >= 10, compared


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_tokens_per_expert_equal_a_count_on_the_full_model(tmp_path, arch):
    from engine_oracle import reference_model

    src = make_source(tmp_path / "src", arch)
    model = reference_model(src)
    rows = token_rows(model.config.vocab_size, rows=3)
    counts = {}

    def count(name):
        def hook(module, args):
            top_k_index = args[1]
            n = torch.bincount(top_k_index.reshape(-1), minlength=module.num_experts)
            counts[name] = counts.get(name, 0) + n

        return hook

    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            module.register_forward_pre_hook(count(name))
    with torch.no_grad():
        for row in rows:
            model(row[None])
    with TensorReader(src) as reader:
        ours = calibrate(build_index(src), reader, rows, EngineOptions())
    assert ours.expert_tokens == {k: v.tolist() for k, v in counts.items()}


@pytest.mark.parametrize("stop_after", [1, 2])
def test_a_pass_resumed_at_a_layer_boundary_measures_the_same(tmp_path, stop_after):
    """A pass stopped after ``stop_after`` layers, its boundary kept on disk (hidden states and statistics),
    then resumed, gives exactly the values of an uninterrupted pass."""
    import json

    from modelopt_streaming.engine.calibrate import Boundary, Calibration
    from modelopt_streaming.engine.hidden import HiddenStore

    src = make_source(tmp_path / "src", "deepseek_v3")
    rows = token_rows(256, rows=3)
    index = build_index(src)
    with TensorReader(src) as reader:
        whole = calibrate(index, reader, rows, EngineOptions(), kv=True)

        class Stop(Exception):
            pass

        def keep(boundary: Boundary, _layers: int) -> None:
            boundary.hidden.save(tmp_path / "hidden.bin")
            (tmp_path / "stats.json").write_text(json.dumps(boundary.calibration.as_json()))
            if boundary.layers_done == stop_after:
                raise Stop

        with pytest.raises(Stop):
            calibrate(index, reader, rows, EngineOptions(), kv=True, on_layer=keep)
        kept = Calibration.from_json(json.loads((tmp_path / "stats.json").read_text()))
        hidden = HiddenStore.open(tmp_path / "hidden.bin", 3, (16, 64), torch.bfloat16)
        resumed = calibrate(index, reader, rows, EngineOptions(), kv=True, resume=Boundary(stop_after, kept, hidden))
    assert resumed.as_json() == whole.as_json()
