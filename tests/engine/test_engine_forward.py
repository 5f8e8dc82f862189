"""The engine's forward pass, one layer at a time from the files, equals transformers' full-model forward bit
for bit on CPU: the hidden state after every layer, the logits, and the tokens each expert receives."""

from __future__ import annotations

import pytest
import torch
from engine_oracle import ARCHS, make_source, reference_model, token_rows

from modelopt_streaming.engine.runner import EngineOptions, LayerStream
from modelopt_streaming.errors import UsageError
from modelopt_streaming.source.index import build_index
from modelopt_streaming.source.reader import TensorReader


def _engine_states(src, ids: torch.Tensor, options: EngineOptions | None = None):
    """Hidden states after the embedding and each layer, and the logits, computed by the engine."""
    with TensorReader(src) as reader:
        stream = LayerStream(build_index(src), reader, options or EngineOptions())
        h = stream.embed(ids)
        states = [h]
        for i in range(stream.num_layers):
            with stream.module(f"model.layers.{i}") as layer:
                h = stream.forward(layer, i, h)
            states.append(h)
        return states, stream.logits(h)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_equals_the_full_model(tmp_path, arch):
    src = make_source(tmp_path / "src", arch)
    model = reference_model(src)
    # Rows on which DeepSeek-V3 routed a token otherwise while its router bias was cast to bf16.
    ids = token_rows(model.config.vocab_size, rows=2, seed=5)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    states, logits = _engine_states(src, ids)
    # transformers reports the last hidden state after the final norm
    expected = list(ref.hidden_states[:-1]) + [None]
    for i, (ours, theirs) in enumerate(zip(states, expected)):
        if theirs is not None:
            assert torch.equal(ours, theirs), f"{arch}: hidden state after layer {i - 1} differs"
    assert torch.equal(model.model.norm(states[-1]), ref.hidden_states[-1])
    assert torch.equal(logits, ref.logits), arch
    # Every parameter and buffer in the dtype from_pretrained gives it (DeepSeek keeps its router bias fp32).
    with TensorReader(src) as reader:
        stream = LayerStream(build_index(src), reader, EngineOptions())
        ours = {n: t.dtype for n, t in stream.skeleton.model.state_dict().items()}
    assert ours == {n: t.dtype for n, t in model.state_dict().items() if n in ours}


def test_attention_is_causal(tmp_path):
    """A later token never changes an earlier position (a config that misses its attention implementation
    would run eager attention with no mask at all: ../shared/engine.md)."""
    src = make_source(tmp_path / "src", "llama")
    ids = token_rows(256, rows=1)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    a = _engine_states(src, ids)[0][-1]
    b = _engine_states(src, changed)[0][-1]
    assert torch.equal(a[0, :-1], b[0, :-1]) and not torch.equal(a[0, -1], b[0, -1])


def test_kimi_k25_text_decoder_runs_under_its_prefix(tmp_path):
    """Kimi-K2.5 nests a DeepSeek-V3 decoder under ``language_model.`` and reports model_type kimi_k2: the
    engine runs it as the same DeepSeek-V3 checkpoint without the prefix."""
    from checkpoints import checkpoint_layout, make_weights, write_checkpoint

    layout, cfg = checkpoint_layout("kimi_k2")
    weights = make_weights(layout, seed=3)
    kimi = write_checkpoint(tmp_path / "kimi", weights, cfg)
    plain_cfg = dict(cfg["text_config"])
    plain = write_checkpoint(
        tmp_path / "plain", {k[len("language_model.") :]: v for k, v in weights.items()}, plain_cfg
    )
    ids = token_rows(256, rows=1)
    states_kimi, logits_kimi = _engine_states(kimi, ids)
    states_plain, logits_plain = _engine_states(plain, ids)
    assert all(torch.equal(a, b) for a, b in zip(states_kimi, states_plain))
    assert torch.equal(logits_kimi, logits_plain)


def test_an_architecture_the_engine_does_not_run_is_refused_by_name(tmp_path):
    from checkpoints import write_checkpoint

    src = write_checkpoint(
        tmp_path / "src",
        {"x.weight": torch.zeros(16, 16, dtype=torch.bfloat16)},
        {"model_type": "bert", "architectures": ["BertModel"]},
    )
    with TensorReader(src) as reader, pytest.raises(UsageError, match="BertModel"):
        LayerStream(build_index(src), reader, EngineOptions())


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_experts_kept_in_host_memory_give_the_same_bits(tmp_path, arch):
    """A layer over the device budget keeps its fused experts in host memory and fetches each expert the router
    picks (on a GPU: one expert at a time in GPU memory); the same operations run, so the bits are the same."""
    src = make_source(tmp_path / "src", arch)
    ids = token_rows(256, rows=2)
    whole = _engine_states(src, ids)
    fetched = _engine_states(src, ids, EngineOptions(device_budget_bytes=1))
    assert all(torch.equal(a, b) for a, b in zip(whole[0], fetched[0])) and torch.equal(whole[1], fetched[1])
