"""Peak memory is bounded by the largest fused group, not by the shard: measured in a subprocess."""

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import save_file

MB = 1024 * 1024

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import modelopt_streaming
    torch.ones(4096, 16).sum()  # warm the allocator and thread pool the way a real run would
    if sys.argv[1] == "run":
        modelopt_streaming.quantize(sys.argv[2], sys.argv[3], progress="none", log=lambda *_: None,
                                    device="cpu", max_shard_size=64 * 1024 * 1024)
    # VmHWM belongs to this process image; ru_maxrss would carry the forking parent's peak over exec.
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_kb": int(hwm.split()[1])}))
""")


def _peak_mb(*args) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_kb"] / 1024


def test_peak_rss_independent_of_shard_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(8192, 2048, generator=g).to(torch.bfloat16)}  # 32 MB copy
    for layer in range(6):
        p = f"model.layers.{layer}.mlp"
        for leaf in ("gate_proj", "up_proj"):
            tensors[f"{p}.{leaf}.weight"] = torch.randn(4096, 2048, generator=g).to(torch.bfloat16)  # 16 MB
        tensors[f"{p}.down_proj.weight"] = torch.randn(2048, 4096, generator=g).to(torch.bfloat16)
        for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{layer}.self_attn.{leaf}.weight"] = torch.randn(2048, 2048, generator=g).to(
                torch.bfloat16
            )
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": 6, "model_type": "llama"}))
    shard_mb = (src / "model.safetensors").stat().st_size / MB
    largest_group_mb = 2 * 16
    del tensors

    baseline = _peak_mb("baseline")
    peak = _peak_mb("run", str(src), str(tmp_path / "out"))
    growth = peak - baseline
    print(f"shard {shard_mb:.0f} MB, baseline {baseline:.0f} MB, peak {peak:.0f} MB, growth {growth:.0f} MB")
    assert shard_mb > 380
    # The group, its float32 chunk temporaries and the 64 MB copy buffer; never the shard.
    assert growth < 4 * largest_group_mb + 64 + 64, (shard_mb, baseline, peak)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 2
