"""Parallel I/O inside one process: reader threads, writer threads in lanes, tensors written at their offsets
from several threads. The oracles: NVIDIA ModelOpt's export (every weight and scale, at each thread count),
the safetensors library (what a file holds), and a sha256 recomputed from the file."""

import threading

import pytest
import torch
from checkpoints import make_model_checkpoint, modelopt_export, weights_match_modelopt
from forkrun import tree_hashes as tree
from safetensors.torch import load_file, save_file

import modelopt_streaming
from modelopt_streaming.jobs import pipeline, quantize_stream
from modelopt_streaming.plan.build import Recipe, build_plan, unit_sources
from modelopt_streaming.sink import output_dir, writer
from modelopt_streaming.sink.writer import PositionalShardWriter, file_digest
from modelopt_streaming.source import reader
from modelopt_streaming.source.index import TensorSpec, build_index


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_model_checkpoint(tmp_path_factory.mktemp("pio") / "src", "deepseek_v3", n_shards=3)


def quantize_small_shards(src, out, threads: int) -> dict[str, str]:
    """Many small output shards (so several lanes share and cross shards); the output tree's hashes."""
    modelopt_streaming.quantize(
        src,
        out,
        device="cpu",
        scale_math="cpu",
        max_shard_size=30_000,
        io_threads=threads,
        progress="none",
    )
    return tree(out)


@pytest.fixture
def mapped_copies(monkeypatch):
    """Every copy into a mapping, counted; pieces of 100 bytes and more are mapped (when mapping is on)."""
    monkeypatch.setattr(writer, "MAPPED_WRITE_MIN_BYTES", 100)
    copies = []
    real_copy = writer.copy_mapped
    monkeypatch.setattr(writer, "copy_mapped", lambda *a: copies.append(1) or real_copy(*a))
    return copies


def test_thread_counts_give_modelopts_bytes_and_the_same_files(src, tmp_path):
    """1, 3 and 8 reader/writer threads: each run's weights and scales equal ModelOpt's export, and every
    file, manifest and provenance included, is the same across thread counts."""
    reference = modelopt_export(src, tmp_path / "modelopt")
    outputs = {}
    for threads in (1, 3, 8):
        outputs[threads] = quantize_small_shards(src, tmp_path / f"t{threads}", threads)
        assert weights_match_modelopt(reference, tmp_path / f"t{threads}") >= 14
    assert sum(f.startswith("model-") for f in outputs[1]) >= 6
    assert outputs[3] == outputs[1] and outputs[8] == outputs[1]


def test_io_threads_must_be_positive(src, tmp_path):
    with pytest.raises(modelopt_streaming.UsageError, match="--io_threads"):
        modelopt_streaming.quantize(src, tmp_path / "out", io_threads=0)


@pytest.mark.parametrize("lanes", [1, 2, 3, 5, 64])
def test_lanes_hand_out_every_unit_once_in_consecutive_balanced_runs(src, lanes):
    plan = build_plan(build_index(src), Recipe(max_shard_size=30_000))
    units = list(plan.units)
    merged = quantize_stream.interleave_lanes(units, lanes)
    assert sorted(id(u) for _, u in merged) == sorted(id(u) for u in units)
    size = {id(u): sum(s.nbytes for s in unit_sources(u)) for u in units}
    position = {id(u): i for i, u in enumerate(units)}
    by_lane: dict[int, list[int]] = {}
    for lane, unit in merged:
        by_lane.setdefault(lane, []).append(position[id(unit)])
    starts = sorted(runs[0] for runs in by_lane.values())
    for runs in by_lane.values():
        # A lane is one consecutive run of the plan's order, handed out in that order.
        assert runs == list(range(runs[0], runs[0] + len(runs)))
    assert starts[0] == 0
    # Balanced by bytes: no lane is more than one unit away from an equal share.
    total, largest = sum(size.values()), max(size.values())
    for runs in by_lane.values():
        assert abs(sum(size[id(units[i])] for i in runs) - total / len(by_lane)) <= largest
    # Lanes with no unit (more lanes than the bytes split into) are dropped, never an empty thread's share.
    assert 1 <= len(by_lane) <= min(lanes, len(units))
    assert len(by_lane) == lanes or lanes > 5


def test_parallel_writer_keeps_each_lane_in_order_and_raises_the_first_error():
    stats = pipeline.Throughput()
    writer = pipeline.ParallelWriter(stats, threads=3, budget=10)
    seen: dict[int, list[int]] = {lane: [] for lane in range(5)}
    for i in range(200):
        lane = i % 5
        writer.submit(seen[lane].append, i, nbytes=1, lane=lane)
    unlaned: list[int] = []
    for i in range(50):
        writer.submit(unlaned.append, i, nbytes=3)
    writer.close()
    for lane, got in seen.items():
        assert got == list(range(lane, 200, 5))
    assert sorted(unlaned) == list(range(50))
    assert stats.write_bytes == 200 + 150

    failing = pipeline.ParallelWriter(pipeline.Throughput(), threads=2, budget=10)
    done = []

    def boom():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        try:
            failing.submit(boom, lane=0)
            # After the error on the same thread: never run (or refused at submit, if the error came first).
            failing.submit(done.append, 1, lane=0)
        finally:
            failing.close()
    assert done == []


def test_reader_threads_read_large_tensors_in_pieces(tmp_path, monkeypatch):
    """A tensor split over 4 threads in 1 KB pieces (and a last, shorter one) reads back as the
    safetensors library reads it; so does a chunk at an odd offset."""
    monkeypatch.setattr(reader, "PARALLEL_CHUNK", 1024)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(37, 301, generator=g).to(torch.bfloat16),  # 22274 bytes: 22 pieces
        "small": torch.randn(5, generator=g),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    index = build_index(tmp_path)
    oracle = load_file(tmp_path / "model.safetensors")
    with reader.TensorReader(tmp_path, threads=4) as r:
        for name in tensors:
            assert torch.equal(r.read(index.tensors[name]), oracle[name])
        raw = oracle["big"].view(torch.uint8).reshape(-1).numpy().tobytes()
        assert bytes(r.read_chunk(index.tensors["big"], 1001, 5000)) == raw[1001:6001]


@pytest.mark.parametrize("mapped", [False, True])
def test_positional_shard_written_by_many_threads_is_renamed_once(tmp_path, mapped_copies, mapped):
    """Six threads write one shard, with pwrite or (tmpfs's way) copies into mappings of odd offsets: the
    safetensors library reads every tensor back and the record's digest is the file's."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(64 + 7 * i, generator=g) for i in range(24)}
    tensors["empty"] = torch.zeros(0)
    specs = [TensorSpec(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    PositionalShardWriter.create(tmp_path, "s.safetensors", specs)
    records = []

    def whole(w: PositionalShardWriter) -> None:
        records.append(w.finish())

    w = PositionalShardWriter(tmp_path, "s.safetensors", specs, on_whole=whole, mapped=mapped)
    names = list(tensors)
    threads = [
        threading.Thread(target=lambda part=names[i::6]: [w.write(n, tensors[n]) for n in part]) for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(records) == 1
    back = load_file(tmp_path / "s.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[n], tensors[n]) for n in tensors)
    assert records[0]["digest"] == file_digest(tmp_path / "s.safetensors")
    assert not list(tmp_path.glob(".*.partial"))
    assert (len(mapped_copies) == 24) if mapped else not mapped_copies


def test_mapped_writes_give_the_same_files(src, tmp_path, monkeypatch, mapped_copies):
    """A whole run whose writers copy into mappings (what they do on tmpfs; forced here on whatever holds
    the test's directory) writes the same files as one with pwrite, and ModelOpt's weights and scales."""
    outputs = {}
    for kinds in ((), (writer.file_system_of(tmp_path),)):
        monkeypatch.setattr(writer, "MAPPED_FILE_SYSTEMS", kinds)
        outputs[len(kinds)] = quantize_small_shards(src, tmp_path / f"mapped{len(kinds)}", threads=3)
        assert bool(mapped_copies) == bool(kinds)
    assert outputs[1] == outputs[0]
    assert weights_match_modelopt(modelopt_export(src, tmp_path / "modelopt"), tmp_path / "mapped1") >= 14


def test_file_system_of_reads_the_mount_table():
    assert writer.file_system_of("/proc/self/status") == "proc"
    assert writer.file_system_of("/") != "unknown"


def test_a_full_file_system_is_refused_before_anything_is_written(src, tmp_path, monkeypatch):
    """Less free space than the shards take: one clear error, no shard and no config written."""
    real = output_dir.shutil.disk_usage
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    out = tmp_path / "out"
    with pytest.raises(
        modelopt_streaming.OutputStateError, match=r"take 0\.\d\d GB and its file system has 0\.00 GB free"
    ):
        modelopt_streaming.quantize(src, out, device="cpu")
    assert not list(out.glob("*.safetensors")) and not (out / "config.json").exists()
