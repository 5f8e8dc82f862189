"""A calibrated run killed after any decoder layer (SIGKILL, deterministic fault injection), then resumed,
gives exactly the files of an uninterrupted run: the calibration continues from the boundary it kept in the
output directory (hidden states and statistics), and a run killed after the calibration finished reads its
result instead of calibrating again."""

from __future__ import annotations

import signal

import pytest
from engine_oracle import make_source, token_rows
from forkrun import run_jobs, tree_hashes
from safetensors.torch import save_file

import modelopt_streaming

KILLED = -signal.SIGKILL
EVERY_LAYER = {"MODELOPT_STREAMING_CALIBRATION_CHECKPOINT_S": "0"}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_resume")
    src = make_source(root / "src", "deepseek_v3")  # 3 decoder layers, MLA, shared and routed experts
    save_file({"input_ids": token_rows(256, rows=4)}, root / "rows.safetensors")
    reference = root / "reference"
    modelopt_streaming.quantize(
        src, reference, calib_data=root / "rows.safetensors", kv_cache="fp8", device="cpu", max_shard_size=200_000
    )
    return src, root / "rows.safetensors", tree_hashes(reference)


def _args(src, rows, out, *extra):
    return [
        "quantize",
        "--input_dir",
        src,
        "--output_dir",
        out,
        "--calib_data",
        rows,
        "--kv_cache",
        "fp8",
        "--device",
        "cpu",
        "--max_shard_size",
        "200000",
        *extra,
    ]


@pytest.mark.slow
def test_killed_after_each_layer_then_resumed_is_byte_identical(case, tmp_path):
    src, rows, reference = case
    jobs = []
    for k in (1, 3):  # the first and the last boundary (gptq's resume test kills after the middle one)
        out = tmp_path / f"k{k}"
        env = {**EVERY_LAYER, "MODELOPT_STREAMING_FAULT": f"layer:{k}"}
        jobs.append({"argv": _args(src, rows, out, "--quiet"), "env": env, "snapshot": str(out)})
        jobs.append({"argv": _args(src, rows, out, "--resume"), "env": EVERY_LAYER, "snapshot": str(out)})
    results = run_jobs(jobs)
    for k, killed, resumed in zip((1, 3), results[::2], results[1::2]):
        assert killed["rc"] == KILLED, f"layer:{k} did not fire: {killed['stderr']}"
        assert "hf_quant_config.json" not in killed["tree"] and not any(n.startswith("model-") for n in killed["tree"])
        assert resumed["rc"] == 0, resumed["stderr"]
        assert f"calibrate: resuming after layer {k}" in resumed["stderr"], resumed["stderr"]
        assert resumed["tree"] == reference, f"layer:{k}"


@pytest.mark.slow
def test_killed_while_writing_after_the_calibration_resumes_from_its_result(case, tmp_path):
    src, rows, reference = case
    out = tmp_path / "out"
    results = run_jobs(
        [
            {"argv": _args(src, rows, out, "--quiet"), "env": {"MODELOPT_STREAMING_FAULT": "unit:3"}},
            {"argv": _args(src, rows, out, "--resume"), "snapshot": str(out)},
        ]
    )
    killed, resumed = results
    assert killed["rc"] == KILLED, killed["stderr"]
    assert resumed["rc"] == 0, resumed["stderr"]
    assert "calibrate: layer" not in resumed["stderr"]  # the kept result, no second calibration
    assert resumed["tree"] == reference


def test_a_changed_calibration_file_is_refused_on_resume(case, tmp_path):
    src, rows, _ = case
    out = tmp_path / "out"
    results = run_jobs(
        [
            {"argv": _args(src, rows, out, "--quiet"), "env": {**EVERY_LAYER, "MODELOPT_STREAMING_FAULT": "layer:1"}},
        ]
    )
    assert results[0]["rc"] == KILLED
    other = tmp_path / "other.safetensors"
    save_file({"input_ids": token_rows(256, rows=4, seed=7)}, other)
    r = run_jobs([{"argv": _args(src, other, out, "--resume")}])[0]
    assert r["rc"] == 2 and "options changed" in r["stderr"] and "calibration" in r["stderr"], r["stderr"]
