"""torchrun's ranks share the calibration rows (whole batches) and reduce their statistics: the files are those
of one process, byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from engine_oracle import make_source, token_rows
from forkrun import tree_hashes
from safetensors.torch import save_file

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _quantize(src, rows, out, *launcher: str, batch: int) -> None:
    args = ["-m", "modelopt_streaming", "quantize", "--input_dir", str(src), "--output_dir", str(out)]
    args += ["--calib_data", str(rows), "--calib_batch_size", str(batch), "--kv_cache", "fp8", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    r = subprocess.run(
        [sys.executable, *launcher, *args, "--max_shard_size", "200000"], env=env, text=True, capture_output=True
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("batch", [2])  # whole batches of 2 per rank; 1 is the easier case of the same split
def test_two_ranks_calibrate_to_the_bytes_of_one_process(tmp_path, batch):
    src = make_source(tmp_path / "src", "qwen3_moe")
    save_file({"input_ids": token_rows(256, rows=5)}, tmp_path / "rows.safetensors")
    _quantize(src, tmp_path / "rows.safetensors", tmp_path / "one", batch=batch)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    _quantize(src, tmp_path / "rows.safetensors", tmp_path / "two", *torchrun, batch=batch)
    assert tree_hashes(tmp_path / "two") == tree_hashes(tmp_path / "one")
