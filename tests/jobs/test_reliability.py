"""Crash-safe exact resume, interrupts, concurrent runs, refusals and disk-full handling, as a user meets
them. Every crash is injected at a chosen step (modelopt_streaming/faults.py), never at a moment picked
by a clock, so each test does the same thing on an idle laptop and on a loaded 2-core runner."""

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from forkrun import run_jobs, tree_hashes
from safetensors.torch import save_file

from modelopt_streaming.errors import IncompleteShardError
from modelopt_streaming.sink.writer import PositionalShardWriter, ShardWriter
from modelopt_streaming.source.index import TensorSpec

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
SHARD = "400KB"  # several output shards from the small source below
KILLED = -signal.SIGKILL


def cmd(*args):
    return [sys.executable, "-m", "modelopt_streaming", *map(str, args)]


def run(*args, env=None, **kw):
    return subprocess.run(cmd(*args), capture_output=True, text=True, env=env or ENV, **kw)


def quantize_args(src: Path, out: Path, *extra) -> list:
    return ["quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", SHARD, "--quiet", *extra]


def fault_env(spec: str, **more) -> dict:
    return {"MODELOPT_STREAMING_FAULT": spec, **more}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """~5 MB of bf16 in 3 shards (fused partners split across them), plus a tokenizer side file."""
    d = tmp_path_factory.mktemp("rel") / "src"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for s in range(3):
        part = {}
        for layer in range(s * 2, s * 2 + 2):
            p = f"model.layers.{layer}"
            for leaf in ("gate_proj", "up_proj", "down_proj"):
                part[f"{p}.mlp.{leaf}.weight"] = torch.randn(256, 256, generator=g).to(torch.bfloat16)
            for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
                part[f"{p}.self_attn.{leaf}.weight"] = torch.randn(256, 256, generator=g).to(torch.bfloat16)
            part[f"{p}.input_layernorm.weight"] = torch.ones(256, dtype=torch.bfloat16)
        name = f"model-{s + 1:05d}-of-00003.safetensors"
        save_file(part, str(d / name))
        weight_map.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6}))
    (d / "tokenizer.json").write_text('{"model": "test"}')
    return d


@pytest.fixture(scope="module")
def reference_dir(src, tmp_path_factory) -> Path:
    """The uninterrupted run, as a user starts it."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = run(*quantize_args(src, out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def reference(reference_dir) -> dict[str, str]:
    files = tree_hashes(reference_dir)
    assert sum(f.startswith("model-") for f in files) >= 4
    return files


@pytest.fixture
def finished(reference_dir, tmp_path) -> Path:
    """A finished output directory of `src` (a copy of the uninterrupted run's)."""
    out = tmp_path / "out"
    shutil.copytree(reference_dir, out)
    return out


@pytest.fixture(scope="module")
def steps(src, tmp_path_factory) -> Counter:
    """How many steps of each kind an uninterrupted run takes, and a resume (of a finished run) too:
    the fault tests cover each of them."""
    out = tmp_path_factory.mktemp("steps") / "out"
    log = tmp_path_factory.mktemp("steps") / "log"
    [first, again] = run_jobs(
        [
            {"argv": quantize_args(src, out), "env": {"MODELOPT_STREAMING_FAULT_LOG": str(log)}},
            {"argv": quantize_args(src, out, "--resume"), "env": {"MODELOPT_STREAMING_FAULT_LOG": str(log) + "2"}},
        ]
    )
    assert first["rc"] == 0 and again["rc"] == 0, first["stderr"] + again["stderr"]
    counts = Counter(log.read_text().split())
    counts["resume"] = Counter(Path(str(log) + "2").read_text().split())["resume"]
    return counts


def spread(count: int, most: int = 8) -> list[int]:
    """Every step when there are few, else `most` of them evenly spaced, first and last included."""
    if count <= most:
        return list(range(1, count + 1))
    return sorted({1 + round(i * (count - 1) / (most - 1)) for i in range(most)})


def test_same_input_same_bytes(src, reference, tmp_path):
    assert run(*quantize_args(src, tmp_path / "again")).returncode == 0
    assert tree_hashes(tmp_path / "again") == reference


def test_every_step_kind_occurs(steps, reference):
    """The hooks sit where the tests below think they do: a run of this source passes every kind."""
    shards = sum(f.startswith("model-") for f in reference)
    assert steps["after_rename"] == shards
    # manifest, one record per shard, index, config.json, final manifest, provenance, hf_quant_config.json
    assert steps["json"] == 1 + shards + 5
    assert steps["mid_tensor"] >= 40 and steps["unit"] >= 20
    # config.json, hf_quant_config.json, index, provenance, then the stale files
    assert steps["resume"] == 5


def _check_crash_state(tree: dict[str, str], reference: dict[str, str]) -> None:
    """What a crash may leave: shards under their final names only when whole, and nothing that looks
    finished (hf_quant_config.json) unless everything is."""
    for name, digest in tree.items():
        if name.startswith("model-"):
            assert digest == reference[name], f"{name} exists under its final name but is not whole"
    if "hf_quant_config.json" in tree:
        assert tree == reference


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mid_tensor", "after_rename", "json"])
def test_sigkill_at_each_step_then_resume_is_byte_identical(kind, src, reference, steps, tmp_path):
    """SIGKILL at the k-th step of this kind (every k, or an even spread of 8 when there are more), then
    `--resume --verify`: every file's sha256 equals the uninterrupted run's."""
    ks = spread(steps[kind])
    jobs = []
    for k in ks:
        out = tmp_path / f"k{k}"
        jobs.append({"argv": quantize_args(src, out), "env": fault_env(f"{kind}:{k}"), "snapshot": str(out)})
        jobs.append({"argv": quantize_args(src, out, "--resume", "--verify"), "snapshot": str(out)})
    results = run_jobs(jobs)
    for k, killed, resumed in zip(ks, results[::2], results[1::2]):
        assert killed["rc"] == KILLED, f"{kind}:{k} did not fire: {killed['stderr']}"
        _check_crash_state(killed["tree"], reference)
        assert resumed["rc"] == 0, f"{kind}:{k}: {resumed['stderr']}"
        assert resumed["tree"] == reference, f"{kind}:{k}"


@pytest.mark.slow
def test_sigkill_during_resume_then_resume_is_byte_identical(src, reference, steps, tmp_path):
    """A run dies while writing its configs (config.json and the index already there); its resume dies
    at each of its own steps; a third run finishes. After every death nothing looks loadable."""
    last_json = steps["json"]  # hf_quant_config.json: everything else is written
    ks = spread(steps["resume"])
    jobs = []
    for k in ks:
        out = tmp_path / f"k{k}"
        jobs.append({"argv": quantize_args(src, out), "env": fault_env(f"json:{last_json}"), "snapshot": str(out)})
        jobs.append(
            {"argv": quantize_args(src, out, "--resume"), "env": fault_env(f"resume:{k}"), "snapshot": str(out)}
        )
        jobs.append({"argv": quantize_args(src, out, "--resume", "--verify"), "snapshot": str(out)})
    results = run_jobs(jobs)
    for k, first, resume, final in zip(ks, results[::3], results[1::3], results[2::3]):
        assert first["rc"] == KILLED and "config.json" in first["tree"] and "hf_quant_config.json" not in first["tree"]
        assert resume["rc"] == KILLED, f"resume:{k} did not fire: {resume['stderr']}"
        _check_crash_state(resume["tree"], reference)
        # vLLM reads config.json first: a resumed directory never offers it before the run is finished.
        assert "config.json" not in resume["tree"], f"resume:{k}"
        assert final["rc"] == 0, final["stderr"]
        assert final["tree"] == reference, f"resume:{k}"


def _wait_for(marker: Path, p: subprocess.Popen) -> None:
    """Until the run reaches its pause step (or dies, which fails the test)."""
    while not marker.exists():
        assert p.poll() is None, p.communicate()[1]
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=0.05)


def test_sigterm_at_a_step_stops_cleanly_and_resumes_identically(src, reference, steps, tmp_path):
    """SIGTERM while the run is paused inside its last shards: exit 130 with the resume command, the
    partial shard removed, finished shards kept, and the resume byte-identical."""
    out, marker = tmp_path / "out", tmp_path / "paused"
    args = ["quantize", "--input_dir", src, "--output_dir", out, "--max_shard_size", SHARD]
    env = {**ENV, **fault_env(f"unit:{steps['unit'] - 1}:pause", MODELOPT_STREAMING_FAULT_MARKER=str(marker))}
    p = subprocess.Popen(cmd(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(marker, p)
    assert list(out.glob(".*.partial")), "the pause should fall inside a shard"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    assert p.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not (out / "hf_quant_config.json").exists() and not (out / "config.json").exists()
    assert not list(out.glob(".*.partial"))
    assert not (out / ".modelopt_streaming.lock").exists()
    r = run(*args, "--resume")
    assert r.returncode == 0, r.stderr
    kept = int(r.stderr.split("resuming: ")[1].split()[0])
    assert kept >= 1  # shards finished before the signal were not redone
    assert tree_hashes(out) == reference


def test_second_run_on_a_busy_directory_is_refused_at_once(src, reference, tmp_path):
    """While one run holds the directory (paused at its second step), a second quantize, --resume or
    --overwrite exits 2 naming the running process and touches nothing; the first then finishes with
    the same bytes as ever."""
    out, marker = tmp_path / "out", tmp_path / "paused"
    env = {**ENV, **fault_env("unit:2:pause", MODELOPT_STREAMING_FAULT_MARKER=str(marker))}
    first = subprocess.Popen(cmd(*quantize_args(src, out)), env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(marker, first)
    before = tree_hashes(out)
    for extra in ([], ["--resume"], ["--overwrite"]):
        r = run(*quantize_args(src, out, *extra))
        assert r.returncode == 2, (extra, r.stderr)
        assert "in use by another modelopt-streaming run" in r.stderr and f"pid {first.pid} " in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert tree_hashes(out) == before
    marker.unlink()  # let the first run go on
    _, err = first.communicate()
    assert first.returncode == 0, err
    assert tree_hashes(out) == reference


def test_disk_full_is_a_clean_error_then_resume_finishes(src, reference, tmp_path):
    out = tmp_path / "out"

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # smaller than one output shard

    r = subprocess.run(
        cmd(*quantize_args(src, out)), capture_output=True, text=True, env=ENV, preexec_fn=limit_file_size
    )
    assert r.returncode == 1
    assert "failed" in r.stderr and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (out / "hf_quant_config.json").exists()
    r = run(*quantize_args(src, out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert tree_hashes(out) == reference


def test_resume_refuses_changed_options_and_source(src, finished, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(src, source)
    out = finished
    before = tree_hashes(out)
    r = run(*quantize_args(source, out, "--resume", "--mlp_only"))
    assert r.returncode == 2 and "options changed" in r.stderr and "scope" in r.stderr
    r = run("quantize", "--input_dir", source, "--output_dir", out, "--max_shard_size", "500KB", "--resume")
    assert r.returncode == 2 and "max_shard_size" in r.stderr
    # The source changes: one layer norm of the second shard is rewritten with another shape.
    shard = source / "model-00002-of-00003.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(shard)
    tensors["model.layers.2.input_layernorm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    save_file(tensors, str(shard))
    r = run(*quantize_args(source, out, "--resume"))
    assert r.returncode == 2 and "source" in r.stderr and "model-00002-of-00003.safetensors" in r.stderr, r.stderr
    assert tree_hashes(out) == before  # refused before anything was deleted


def test_resume_discards_corrupt_shard_with_verify(src, reference, finished):
    out = finished
    shard = sorted(out.glob("model-*.safetensors"))[2]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, different bytes: only the hash sees it
    shard.write_bytes(bytes(data))
    (out / f".{shard.name}.partial").write_bytes(b"junk")  # as a run that died while redoing it leaves
    r = run(*quantize_args(src, out, "--resume", "--verify"))
    assert r.returncode == 0, r.stderr
    assert tree_hashes(out) == reference


def test_resume_redoes_a_shard_whose_record_survived_but_file_was_lost(src, reference, tmp_path):
    """A shard's record from an unfinished run, with its file gone or cut short: redone, not trusted."""
    out = tmp_path / "out"
    [killed] = run_jobs([{"argv": quantize_args(src, out), "env": fault_env("after_rename:3")}])
    assert killed["rc"] == KILLED
    finished = sorted(out.glob("model-*.safetensors"))
    finished[0].unlink()
    finished[1].write_bytes(finished[1].read_bytes()[:-10])
    r = run(*quantize_args(src, out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert tree_hashes(out) == reference


def test_resume_leaves_files_it_did_not_write(src, reference, tmp_path):
    out = tmp_path / "out"
    [killed] = run_jobs([{"argv": quantize_args(src, out), "env": fault_env("after_rename:2")}])
    assert killed["rc"] == KILLED
    (out / "my_notes.safetensors").write_bytes(b"mine")
    r = run(*quantize_args(src, out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert (out / "my_notes.safetensors").read_bytes() == b"mine"
    assert {k: v for k, v in tree_hashes(out).items() if k != "my_notes.safetensors"} == reference


@pytest.mark.parametrize("case", ["finished", "killed_after_side_files", "killed_mid_shard"])
def test_overwrite_replaces_our_own_output(case, src, reference, steps, tmp_path):
    """--overwrite replaces a directory that is provably ours: a finished run with other options, or a
    run that died (even after copying side files, before its provenance named them)."""
    out = tmp_path / "out"
    if case == "finished":
        assert run(*quantize_args(src, out, "--mlp_only", "--max_shard_size", "1MB")).returncode == 0
    else:
        shards = sum(f.startswith("model-") for f in reference)
        step = f"json:{1 + shards + 2}" if case == "killed_after_side_files" else "mid_tensor:7"
        [killed] = run_jobs([{"argv": quantize_args(src, out), "env": fault_env(step)}])
        assert killed["rc"] == KILLED
        if case == "killed_after_side_files":
            assert (out / "tokenizer.json").exists() and not (out / "modelopt_streaming.json").exists()
    r = run(*quantize_args(src, out, "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert tree_hashes(out) == reference


@pytest.mark.parametrize("where", ["top", "subfolder", "no_manifest"])
def test_overwrite_refuses_a_directory_holding_files_we_did_not_write(where, src, reference_dir, tmp_path):
    out = tmp_path / "out"
    if where == "no_manifest":
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model-00001-of-00002.safetensors").write_bytes(b"user's own")
    else:
        shutil.copytree(reference_dir, out)
        if where == "top":
            (out / "notes.txt").write_text("mine")
        else:
            (out / "eval").mkdir()
            (out / "eval" / "results.json").write_text("{}")
    before = tree_hashes(out)
    r = run(*quantize_args(src, out, "--overwrite"))
    assert r.returncode == 2, r.stderr
    assert "--overwrite refused" in r.stderr and "nothing was deleted" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert tree_hashes(out) == before


@pytest.mark.parametrize("case", ["inside_input", "not_empty", "unwritable", "not_our_dir_resume"])
def test_refusals_write_nothing(src, tmp_path, case):
    before = tree_hashes(src)
    out = tmp_path / "out"
    extra = []
    if case == "inside_input":
        out = src / "nvfp4"
    elif case == "not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "unwritable":
        out = Path("/proc/modelopt-streaming-test/out")
    elif case == "not_our_dir_resume":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        extra = ["--resume"]
    r = run("quantize", "--input_dir", src, "--output_dir", out, *extra)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert tree_hashes(src) == before
    if case in ("not_empty", "not_our_dir_resume"):
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    elif case == "inside_input":
        assert not out.exists()


def _specs() -> tuple[list[TensorSpec], dict[str, torch.Tensor]]:
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.zeros(0, dtype=torch.bfloat16),
        "c": torch.arange(10, dtype=torch.int8),
    }
    return [
        TensorSpec(n, {torch.float32: "F32", torch.bfloat16: "BF16", torch.int8: "I8"}[t.dtype], tuple(t.shape))
        for n, t in tensors.items()
    ], tensors


def test_positional_writer_renames_only_a_fully_written_shard(tmp_path):
    """Tensors written in any order at their offsets give the file safetensors reads back (the oracle);
    a shard with a planned range nobody wrote is refused and keeps its temporary name."""
    from safetensors.torch import load_file

    specs, tensors = _specs()
    PositionalShardWriter.create(tmp_path, "whole.safetensors", specs)
    w = PositionalShardWriter(tmp_path, "whole.safetensors", specs)
    for name in ("c", "a", "b"):
        w.write(name, tensors[name])
    w.finish()
    back = load_file(tmp_path / "whole.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[n], tensors[n]) for n in tensors)

    PositionalShardWriter.create(tmp_path, "holed.safetensors", specs)
    w = PositionalShardWriter(tmp_path, "holed.safetensors", specs)
    w.write("a", tensors["a"])
    w.write("b", tensors["b"])
    w.open("c").write_bytes(tensors["c"].numpy().tobytes()[:4])  # cut short
    with pytest.raises(IncompleteShardError, match=r"'c'"):
        w.finish()
    assert not (tmp_path / "holed.safetensors").exists()
    # What several ranks wrote together counts: the union covers the shard.
    PositionalShardWriter.create(tmp_path, "shared.safetensors", specs)
    w = PositionalShardWriter(tmp_path, "shared.safetensors", specs)
    w.write("a", tensors["a"])
    w.write("b", tensors["b"])
    with pytest.raises(IncompleteShardError):
        w.finish(w.digests())
    other = PositionalShardWriter(tmp_path, "shared.safetensors", specs)
    other.write("c", tensors["c"])
    other.close()
    w.finish(w.digests() | other.digests())
    assert torch.equal(load_file(tmp_path / "shared.safetensors")["c"], tensors["c"])


def test_shard_writer_matches_safetensors(tmp_path):
    from safetensors.torch import load_file

    specs, tensors = _specs()
    w = ShardWriter(tmp_path, "s.safetensors", specs)
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
    back = load_file(tmp_path / "s.safetensors")
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)
