"""The Hessians the engine accumulates for GPTQ (engine/hessian.py) equal XᵀX of the inputs transformers' full
model feeds each Linear and each expert, taken here with hooks on the full model, bit for bit on CPU."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from engine_oracle import make_source, reference_model, token_rows

from modelopt_streaming.engine import hessian
from modelopt_streaming.engine.runner import EngineOptions, LayerStream
from modelopt_streaming.source.index import build_index
from modelopt_streaming.source.reader import TensorReader

# The fused groups of the plan share their input: one Hessian each (the engine is given the key).
_GROUPS = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj|w1|w3|q_a_proj|kv_a_proj_with_mqa)$")


def _key(name: str) -> str:
    m = _GROUPS.search(name)
    if m is None:
        return name
    group = {"q_a_proj": "qa", "kv_a_proj_with_mqa": "qa", "w1": "gate_up", "w3": "gate_up"}.get(m[1])
    group = group or ("qkv" if m[1] in ("q_proj", "k_proj", "v_proj") else "gate_up")
    return name[: m.start()] + "." + group


def _xtx(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x


def _add(sums: dict, key, x: torch.Tensor) -> None:
    sums[key] = _xtx(x) if key not in sums else sums[key] + _xtx(x)


def _reference(src, batches):
    """Full model, batch by batch: XᵀX of every Linear's input, and for every fused experts module each expert's
    gate/up input (the tokens routed to it, in the order of transformers' eager loop) and down input."""
    model = reference_model(src)
    linears, experts = {}, {}
    handles = []
    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in path:
            handles.append(mod.register_forward_pre_hook(lambda _m, a, p=path: _add(linears, p, a[0])))
        elif hessian.is_fused_experts(mod):

            def routed(m, args, p=path):
                hidden, index = args[0], args[1]
                mask = F.one_hot(index, num_classes=m.num_experts).permute(2, 1, 0)
                for e in range(m.num_experts):
                    _pos, tok = torch.where(mask[e])
                    if tok.numel() == 0:
                        continue
                    x = hidden[tok]
                    if getattr(m, "is_transposed", False):
                        gate_up = x @ m.gate_up_proj[e]
                    else:
                        gate_up = F.linear(x, m.gate_up_proj[e])
                    if getattr(m, "has_bias", False):
                        gate_up = gate_up + m.gate_up_proj_bias[e]
                    _add(experts, (p, "gate_up", e), x)
                    _add(experts, (p, "down", e), m._apply_gate(gate_up))

            handles.append(mod.register_forward_pre_hook(routed))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    return linears, experts


def _engine(src, batches, selected=None):
    linears, experts, counts = {}, {}, {}
    with TensorReader(src) as reader:
        stream = LayerStream(build_index(src), reader, EngineOptions())
        hidden = [stream.embed(ids) for ids in batches]
        for i in range(stream.num_layers):
            path = f"model.layers.{i}"
            with stream.module(path) as layer:
                lin = hessian.LinearHessians(_key)
                handles = lin.attach(layer, lambda p, path=path: f"{path}.{p}")
                exp = hessian.attach_expert_hessians(layer, lambda p, path=path: f"{path}.{p}", selected)
                try:
                    hidden = [stream.forward(layer, i, h) for h in hidden]
                finally:
                    for h in handles:
                        h.remove()
                    hessian.detach_expert_hessians(layer)
                lin.check()
                linears.update({k: s.h for k, s in lin.sums.items()})
                counts.update({k: s.tokens for k, s in lin.sums.items()})
                for name, e in exp.items():
                    for k, s in e.gate_up.items():
                        experts[(name, "gate_up", k)] = s.h
                    for k, s in e.down.items():
                        experts[(name, "down", k)] = s.h
    return linears, experts, counts


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_hessians_equal_xtx_of_the_full_models_inputs(tmp_path, arch):
    src = make_source(tmp_path / "src", arch)
    ids = token_rows(256, rows=4, seed=5)
    batches = [ids[:2], ids[2:]]
    ref_lin, ref_exp = _reference(src, batches)
    lin, exp, counts = _engine(src, batches)
    # Every Linear of a group was fed the group's input: its Hessian is the group's.
    assert {_key(n) for n in ref_lin} == set(lin)
    for name, ref in ref_lin.items():
        assert torch.equal(lin[_key(name)], ref), name
    assert all(n == 4 * 16 for n in counts.values())
    assert set(exp) == set(ref_exp)
    for key, ref in ref_exp.items():
        assert torch.equal(exp[key], ref), key
    if arch != "llama":
        assert exp  # experts received tokens
    if arch == "deepseek_v3":
        assert "model.layers.0.self_attn.qa" in lin and "model.layers.1.mlp.shared_experts.gate_up" in lin


def test_expert_groups_accumulate_only_their_experts(tmp_path):
    src = make_source(tmp_path / "src", "qwen3_moe")
    batches = [token_rows(256, rows=2, seed=1)]
    _lin, every, _ = _engine(src, batches)
    _lin, some, _ = _engine(src, batches, selected=[1, 3])
    assert some and set(some) == {k for k in every if k[2] in (1, 3)}
    assert all(torch.equal(some[k], every[k]) for k in some)
    assert hessian.expert_groups(256, 205 * 2**20, 52 * 2**30) == [range(256)]
    groups = hessian.expert_groups(256, 205 * 2**20, 10 * 2**30)
    assert [len(g) for g in groups] == [49] * 5 + [11] and groups[-1][-1] == 255
    assert hessian.expert_groups(4, 100, 10) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]


def test_a_group_whose_members_see_other_inputs_is_refused():
    lin = hessian.LinearHessians(lambda n: "one")
    seq = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    handles = lin.attach(seq, lambda p: p)
    with torch.no_grad():
        seq(torch.randn(3, 16))
    for h in handles:
        h.remove()
    with pytest.raises(ValueError, match="do not share their input"):
        lin.check()
