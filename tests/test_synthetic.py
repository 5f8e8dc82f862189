"""The synthetic DeepSeek-V3 generator used by the demo and benchmarks names tensors as transformers does."""

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import synthetic_checkpoint as synth  # noqa: E402


def test_layout_matches_transformers_deepseek_v3(tmp_path):
    import transformers as tf

    shape = replace(synth.PRESETS["tiny"], mtp_layers=0)
    cfg = tf.DeepseekV3Config(
        **{k: v for k, v in shape.config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    )
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    model.to_empty(device="cpu").to(torch.bfloat16).save_pretrained(tmp_path)
    from safetensors import safe_open

    names = {}
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                names[k] = tuple(sf.get_slice(k).get_shape())
    ours = {k: shp for k, (shp, _) in synth.tensor_layout(shape).items()}
    assert ours == names
