"""quantize's options as one object: every option checked when the object is built, before any work; the
keywords and ``options=`` are the same run; messages go to the package's logger, whose handlers the
library leaves to its caller."""

import json
import logging

import pytest
from checkpoints import make_model_checkpoint

import modelopt_streaming
from modelopt_streaming import QuantizeOptions, UsageError, quantize
from modelopt_streaming.cli import main


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_model_checkpoint(tmp_path_factory.mktemp("options") / "src", "llama", n_shards=2)


BAD = [
    ({"mlp_only": True, "experts_only": True}, "--mlp_only and --experts_only"),
    ({"scale_math": "gpu"}, "--scale_math"),
    ({"max_shard_size": 0}, "--max_shard_size"),
    ({"resume": True, "overwrite": True}, "--resume and --overwrite"),
    ({"format": "gguf"}, "--format"),
    ({"input_scales_from": "ref", "weight_only": True}, "--input_scales_from and --weight_only"),
    ({"io_threads": 0}, "--io_threads"),
    ({"progress": "loud"}, "progress"),
    ({"device": "no-such-device"}, "--device"),
]


@pytest.mark.parametrize(("bad", "words"), BAD)
def test_each_option_is_checked_before_any_work(bad, words, tmp_path):
    with pytest.raises(UsageError, match=words):
        QuantizeOptions(**bad)
    # Before the input is even looked at: a missing input directory is not what is reported.
    with pytest.raises(UsageError, match=words):
        quantize(tmp_path / "missing", tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


def test_options_object_and_keywords_are_the_same_run(src):
    by_keywords = quantize(src, dry_run=True, mlp_only=True, exclude=["model.layers.0.*"])
    options = QuantizeOptions(dry_run=True, mlp_only=True, exclude=("model.layers.0.*",))
    same = quantize(src, options=options)
    same.phases = by_keywords.phases = {}  # times
    assert same.as_dict() == by_keywords.as_dict()
    # Keywords apply over the object.
    widened = quantize(src, options=options, mlp_only=False)
    assert widened.quantized_weights > by_keywords.quantized_weights
    with pytest.raises(TypeError):
        quantize(src, dry_run=True, log=print)


def test_messages_go_to_the_logger_and_the_library_installs_no_handler(src, tmp_path, caplog):
    root_handlers = list(logging.getLogger().handlers)
    package = logging.getLogger("modelopt_streaming")
    before = (list(package.handlers), package.level, package.propagate)
    caplog.set_level(logging.INFO, logger="modelopt_streaming")
    quantize(src, tmp_path / "out", progress="none", device="cpu")
    assert sum("activation scales are not calibrated" in m for m in caplog.messages) == 1
    assert any(m.startswith("codec: ") for m in caplog.messages)
    assert logging.getLogger().handlers == root_handlers
    assert list(package.handlers) == before[0] and package.propagate == before[2]


def test_cli_prints_each_message_once_and_puts_the_logger_back(src, tmp_path, capsys):
    package = logging.getLogger("modelopt_streaming")
    before = (list(package.handlers), package.level, package.propagate)
    out = tmp_path / "out"
    assert main(["quantize", "--input_dir", str(src), "--output_dir", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("activation scales are not calibrated") == 1 and err.count("codec: ") == 1
    assert (list(package.handlers), package.level, package.propagate) == before
    assert main(["quantize", "--input_dir", str(src), "--output_dir", str(out), "--overwrite", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_provenance_keys_keep_their_order(src, tmp_path):
    """The three jobs build modelopt_streaming.json from one builder; the files keep the keys in the order
    they always had (the bytes of an output do not change with this tool's internals)."""
    quantize(src, tmp_path / "mo", progress="none", device="cpu")
    modelopt_streaming.convert(tmp_path / "mo", tmp_path / "ct", "compressed-tensors")
    modelopt_streaming.decompress(tmp_path / "mo", tmp_path / "dense")
    common = ["side_files", "shards", "shard_digest"]
    expected = {
        "mo": ["tool", "version", "options", "source", "counts", "unquantized", "zero_weights", *common, "warnings"],
        "ct": ["tool", "version", "command", "options", "source", "forced_groups", "exact_reciprocals"]
        + ["source_configs", *common],
        "dense": ["tool", "version", "command", "options", "source", "dequantized", *common],
    }
    for name, keys in expected.items():
        assert list(json.loads((tmp_path / name / "modelopt_streaming.json").read_text())) == keys, name
