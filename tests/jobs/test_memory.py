"""Memory is bounded by the read-ahead budget and the largest fused group, not by the shard or the model:
the read-ahead bound as a unit, then the peak of a whole run in a subprocess, both with the slowest
possible consumer (held until the reader can load no more), so the worst case is what gets measured."""

import json
import subprocess
import sys
import textwrap
import threading

import torch
from safetensors.torch import save_file

from modelopt_streaming.jobs import pipeline

MB = 1024 * 1024


def test_read_ahead_holds_at_most_the_budget_plus_one_item(monkeypatch):
    budgets = []

    class Watched(pipeline._ByteBudget):
        def __init__(self, budget: int):
            super().__init__(budget)
            budgets.append(self)

    monkeypatch.setattr(pipeline, "_ByteBudget", Watched)
    budget = 100
    sizes = [30, 10, 50, 20, 120, 5, 5, 5, 60, 40, 10, 100, 1, 70, 35]  # one item larger than the budget
    lock = threading.Lock()
    held: dict[int, int] = {}  # loaded (or loading) and not yet finished by the consumer
    peak_bytes = peak_items = 0

    def load(i: int) -> int:
        nonlocal peak_bytes, peak_items
        with lock:
            held[i] = sizes[i]
            peak_bytes = max(peak_bytes, sum(held.values()))
            peak_items = max(peak_items, len(held))
        return i

    order = []
    for i, data in pipeline.read_ahead(range(len(sizes)), load, sizes.__getitem__, budget, pipeline.Throughput()):
        assert data == i
        # The slowest consumer: keep this item until the reader waits for room or has loaded everything.
        gate = budgets[0]
        while not gate.waiting.wait(0.01):
            with lock:
                if max(held) == len(sizes) - 1:
                    break
        gate.waiting.clear()
        with lock:
            del held[i]
        order.append(i)
    assert order == list(range(len(sizes)))
    assert peak_bytes <= budget + max(sizes)
    # Tighter, as the budget is kept: never more than the budget, except one item alone that exceeds it.
    assert peak_bytes <= max(budget, max(sizes))
    # The reader did read ahead (several items at once): the bound was under load, not idle.
    assert peak_items >= 4


CHILD = textwrap.dedent("""
    import json, sys, threading
    import torch
    import modelopt_streaming
    from modelopt_streaming.jobs import pipeline
    from modelopt_streaming.jobs import quantize_stream
    torch.ones(4096, 16).sum()  # warm the allocator and thread pool the way a real run would
    fullest = [0]
    if sys.argv[1] == "run":
        quantize_stream.READ_AHEAD_BYTES = int(sys.argv[4])
        quantize_stream.WRITE_AHEAD_BYTES = int(sys.argv[5])
        budgets = []

        class Watched(pipeline._ByteBudget):
            def __init__(self, budget):
                super().__init__(budget)
                budgets.append(self)

            def acquire(self, n, cancelled):
                super().acquire(n, cancelled)
                fullest[0] = max(fullest[0], self.used)

        pipeline._ByteBudget = Watched
        encode = quantize_stream._encode_unit

        def slow_consumer(*args, **kw):
            # Hold each unit until the reader waits for room (or has read everything): the read-ahead
            # is as full as it can get every time the codec runs.
            gate = budgets[-1]
            reader = next((t for t in threading.enumerate() if t.name == "read-ahead"), None)
            while not gate.waiting.wait(0.01) and reader is not None and reader.is_alive():
                pass
            gate.waiting.clear()
            return encode(*args, **kw)

        quantize_stream._encode_unit = slow_consumer
        modelopt_streaming.quantize(sys.argv[2], sys.argv[3], progress="none",
                                    device="cpu", max_shard_size=10**12)
    # VmHWM belongs to this process image; ru_maxrss would carry the forking parent's peak over exec.
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_kb": int(hwm.split()[1]), "fullest": fullest[0]}))
""")


def _child(*args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_peak_rss_is_bounded_by_the_read_ahead_not_the_shard(tmp_path):
    """A 400 MB source shard written as one output shard (nothing restarts the pipeline between shards),
    a 48 MB read-ahead budget held full by a slow consumer: the process grows by the budget, the unit
    being encoded and its outputs in the writer's queue, never by the shard."""
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
    largest_group_mb = 2 * 16  # gate/up
    del tensors
    budget_mb = 48
    write_budget_mb = 3 * largest_group_mb // 4  # three gate/up groups' encoded outputs (a quarter of the input)

    baseline = _child("baseline")["peak_kb"] / 1024
    run = _child("run", str(src), str(tmp_path / "out"), str(budget_mb * MB), str(write_budget_mb * MB))
    growth = run["peak_kb"] / 1024 - baseline
    print(f"shard {shard_mb:.0f} MB, baseline {baseline:.0f} MB, growth {growth:.0f} MB, fullest {run['fullest'] / MB}")
    assert shard_mb > 380
    assert len(list((tmp_path / "out").glob("model*.safetensors"))) == 1
    # The slow consumer kept the read-ahead at its budget (within one unit of it): the worst case ran.
    assert run["fullest"] > (budget_mb - largest_group_mb) * MB
    # Budget + the group being encoded (bf16 in, its float32 working copy chunked by the kernel) + the
    # encoded outputs queued for the writer threads (their own budget) + slack for the allocator and the
    # threads' stacks; the 400 MB shard never counts.
    assert growth < budget_mb + 2 * largest_group_mb + write_budget_mb + 64, (shard_mb, baseline, growth)
