"""Same bytes whatever runs the job: fused or reference codec, one process or torchrun's two."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import make_model_checkpoint
from forkrun import tree_hashes as tree

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def quantize_cli(src: Path, out: Path, *extra: str, torchrun: bool = False, env=None):
    """One run as a user types it: the console module, or under torchrun with two processes (standalone:
    torchrun picks a free port itself, so parallel test runs never collide)."""
    args = ["-m", "modelopt_streaming", "quantize", "--input_dir", str(src), "--output_dir", str(out), *extra]
    if torchrun:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
        env = {k: v for k, v in (env or os.environ).items() if k not in DIST_VARS}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(src: Path, outs: tuple[Path, Path], *extra: str, env_extra: dict | None = None):
    """Two ranks started by hand, as on two nodes: no torchrun agent stops one when the other dies, so
    what a survivor does is the tool's own doing."""
    port = free_port()
    procs = []
    for rank, out in enumerate(outs):
        env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
        env.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env_extra or {}))
        args = ["quantize", "--input_dir", str(src), "--output_dir", str(out), "--device", "cpu", *extra]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "modelopt_streaming", *args], env=env, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def two_ranks(src: Path, outs: tuple[Path, Path], *extra: str, env_extra: dict | None = None):
    """``start_ranks``, then each finished process's (returncode, stderr)."""
    procs = start_ranks(src, outs, *extra, env_extra=env_extra)
    errors = [p.communicate()[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errors)]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_model_checkpoint(tmp_path_factory.mktemp("scale") / "src", "deepseek_v3", n_shards=3)


@pytest.fixture(scope="module")
def single(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    quantize_cli(src, out, "--max_shard_size", "30KB", "--quiet")
    files = tree(out)
    assert sum(f.startswith("model-") for f in files) >= 6
    return files


def test_reference_codec_gives_the_same_files(src, single, tmp_path):
    env = {**os.environ, "MODELOPT_STREAMING_CODEC": "reference"}
    r = quantize_cli(src, tmp_path / "out", "--max_shard_size", "30KB", env=env)
    assert "codec: torch reference codec on cpu" in r.stderr
    assert tree(tmp_path / "out") == single


@pytest.mark.slow
def test_torchrun_two_processes_gives_the_same_files(src, single, tmp_path):
    r = quantize_cli(src, tmp_path / "out", "--max_shard_size", "30KB", "--device", "cpu", torchrun=True)
    assert tree(tmp_path / "out") == single
    assert r.stdout.count("wrote ") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_torchrun_resume_after_one_run(src, single, tmp_path):
    """A torchrun job resumes a directory a single process left half-done, with the same result."""
    out = tmp_path / "out"
    quantize_cli(src, out, "--max_shard_size", "30KB", "--quiet")
    for p in sorted(out.glob("model-*.safetensors"))[::2]:
        p.unlink()
    (out / "hf_quant_config.json").unlink()
    quantize_cli(src, out, "--max_shard_size", "30KB", "--resume", torchrun=True)
    assert tree(out) == single


@pytest.mark.slow
def test_torchrun_splits_units_inside_one_shard(src, tmp_path):
    """One output shard and two ranks: each rank writes its share of the units at their planned offsets."""
    one, two = tmp_path / "one", tmp_path / "two"
    quantize_cli(src, one, "--quiet")
    assert len(list(one.glob("model-*.safetensors"))) == 1
    quantize_cli(src, two, "--device", "cpu", torchrun=True)
    assert tree(two) == tree(one)


@pytest.mark.slow
def test_a_rank_that_dies_is_named_and_the_run_resumes_identically(src, single, tmp_path):
    """Rank 1 is killed (SIGKILL) in the middle of its second tensor; rank 0 finishes its share, then
    stops at once with a message naming rank 1 instead of waiting out a collective timeout; a resume
    gives the single process's files."""
    out = tmp_path / "out"
    fault = {"MODELOPT_STREAMING_FAULT": "mid_tensor:2:rank=1"}
    (rc0, err0), (rc1, _) = two_ranks(src, (out, out), "--max_shard_size", "30KB", env_extra=fault)
    assert rc1 == -signal.SIGKILL
    assert rc0 == 1, err0
    assert "rank 1 stopped before the 'write shares' step" in err0 and "--resume" in err0
    assert "Traceback" not in err0
    assert not (out / "hf_quant_config.json").exists() and not (out / ".modelopt_streaming.lock").exists()
    quantize_cli(src, out, "--max_shard_size", "30KB", "--resume", "--verify", "--quiet")
    assert tree(out) == single


@pytest.mark.slow
def test_a_stalled_rank_is_named_once_its_share_should_have_been_done(src, single, tmp_path):
    """Rank 1 stops making progress (paused by the hook at its first unit, alive, connections open, as a
    hung node); rank 0 finishes its share and waits the slack it was given plus its share's time at the
    slowest rate, then stops naming rank 1. The resume gives the single process's files."""
    out, marker = tmp_path / "out", tmp_path / "rank1-paused"
    env = {
        "MODELOPT_STREAMING_FAULT": "unit:1:pause:rank=1",
        "MODELOPT_STREAMING_FAULT_MARKER": str(marker),
        "MODELOPT_STREAMING_RANK_SLACK_S": "2",
    }
    rank0, rank1 = start_ranks(src, (out, out), "--max_shard_size", "30KB", env_extra=env)
    _, err0 = rank0.communicate()
    rank1.kill()  # it never goes on by itself: paused, or stopped at the next step without rank 0
    rank1.communicate()
    assert rank0.returncode == 1, err0
    assert "rank 1 did not reach the 'write shares' step within 2 s" in err0 and "--resume" in err0
    assert "Traceback" not in err0
    quantize_cli(src, out, "--max_shard_size", "30KB", "--resume", "--verify", "--quiet")
    assert tree(out) == single


@pytest.mark.slow
def test_ranks_that_do_not_share_the_output_directory_stop_before_any_work(src, tmp_path):
    """Each rank sees its own directory under the same name (two nodes, no shared file system): the
    ranks refuse, naming the blind rank, before a byte of any shard is written."""
    mine, theirs = tmp_path / "node0" / "out", tmp_path / "node1" / "out"
    (rc0, err0), (rc1, err1) = two_ranks(src, (mine, theirs), "--max_shard_size", "30KB")
    assert rc0 == 2 and rc1 == 2, err0 + err1
    assert "rank 1 on" in err0 and "file system they all share" in err0 and len(err0.strip().splitlines()) == 1
    assert not theirs.exists()
    assert not list(mine.glob("*.safetensors")) and not list(mine.glob(".*.partial"))
    assert not (mine / ".modelopt_streaming.lock").exists()


def test_world_size_without_a_process_group_is_refused(src, tmp_path):
    """WORLD_SIZE=2 inherited by a plain call (no torchrun rendezvous): refused, not run twice over."""
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "WORLD_SIZE": "2", "RANK": "0"}
    api = (
        "import sys, modelopt_streaming as m\n"
        "try:\n    m.quantize(sys.argv[1], sys.argv[2], progress='none')\n"
        "except m.UsageError as e:\n    print('refused:', e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", api, str(src), str(tmp_path / "api")], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and "refused: WORLD_SIZE=2" in r.stdout and "no process group" in r.stdout, r.stderr
    assert not (tmp_path / "api").exists()
    args = ["quantize", "--input_dir", str(src), "--output_dir", str(tmp_path / "cli")]
    r = subprocess.run([sys.executable, "-m", "modelopt_streaming", *args], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "WORLD_SIZE=2" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "cli").exists()


def test_batch_share_gives_each_rank_whole_batches_in_turn():
    """The split calibration and evaluate use under torchrun, against shares worked out by hand: 5 rows in batches
    of 2 are [0, 1], [2, 3], [4]; batch k goes to rank k % world."""
    from modelopt_streaming.jobs.distributed import batch_share

    assert [batch_share(5, 2, r, 1) for r in range(1)] == [[(0, 2), (2, 2), (4, 1)]]
    assert [batch_share(5, 2, r, 2) for r in range(2)] == [[(0, 2), (4, 1)], [(2, 2)]]
    assert [batch_share(5, 2, r, 4) for r in range(4)] == [[(0, 2)], [(2, 2)], [(4, 1)], []]
    assert [batch_share(6, 3, r, 2) for r in range(2)] == [[(0, 3)], [(3, 3)]]
