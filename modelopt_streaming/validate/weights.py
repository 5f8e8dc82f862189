"""``compare-weights``: byte-level comparison of two NVFP4 checkpoints, optionally against the source."""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelopt_streaming.codec.nvfp4 import dequantize
from modelopt_streaming.plan.names import module_kind
from modelopt_streaming.source.index import build_index
from modelopt_streaming.source.reader import TensorReader
from modelopt_streaming.validate.checkpoint import ModuleView, NVFP4Checkpoint


@dataclass
class ModuleComparison:
    name: str
    shape_match: bool
    packed_identical_share: float
    block_scales_identical: bool
    weight_scale_2_equal: bool
    input_scale: str  # "equal", "differs", "only in A", "only in B", "absent"
    first_bytes: tuple[list[int], list[int]]
    error_a: dict | None = None
    error_b: dict | None = None

    @property
    def identical(self) -> bool:
        return (
            self.shape_match
            and self.packed_identical_share == 1.0
            and self.block_scales_identical
            and self.weight_scale_2_equal
        )


@dataclass
class WeightComparison:
    a: str
    b: str
    modules: list[ModuleComparison] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    quantized_only_a: list[str] = field(default_factory=list)
    quantized_only_b: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {
            "a": self.a,
            "b": self.b,
            "compared": len(self.modules),
            "identical": sum(m.identical for m in self.modules),
            "packed_bytes_identical_share": (
                sum(m.packed_identical_share for m in self.modules) / max(1, len(self.modules))
            ),
            "block_scales_identical": sum(m.block_scales_identical for m in self.modules),
            "weight_scale_2_equal": sum(m.weight_scale_2_equal for m in self.modules),
            "input_scale": dict(_count(m.input_scale for m in self.modules)),
            "tensors_only_in_a": self.only_a,
            "tensors_only_in_b": self.only_b,
            "quantized_only_in_a": self.quantized_only_a,
            "quantized_only_in_b": self.quantized_only_b,
            "differing_modules": [m.name for m in self.modules if not m.identical][:50],
        }
        errs = self.error_by_kind()
        if errs:
            out["quantization_error_by_kind"] = errs
        return out

    def error_by_kind(self) -> dict:
        by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for m in self.modules:
            for label, e in (("a", m.error_a), ("b", m.error_b)):
                if e:
                    by_kind[module_kind(m.name)][f"{label}_rel_mse"].append(e["rel_mse"])
                    by_kind[module_kind(m.name)][f"{label}_snr_db"].append(e["snr_db"])
        return {k: {key: sum(v) / len(v) for key, v in d.items()} for k, d in by_kind.items()}


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _error(ck: NVFP4Checkpoint, v: ModuleView, source: torch.Tensor) -> dict:
    ws2 = torch.tensor(ck.weight_scale_2(v), dtype=torch.float32)
    deq = dequantize(ck.read(v.weight), ck.read(v.weight_scale), ws2)
    ref = source.float()
    mse = float(((deq - ref) ** 2).mean())
    power = float((ref**2).mean())
    rel = mse / power if power else math.inf
    return {"rel_mse": rel, "snr_db": -10 * math.log10(rel) if rel > 0 else math.inf}


def compare_weights(
    a: str | Path, b: str | Path, tensor: str | None = None, source: str | Path | None = None
) -> WeightComparison:
    """Compare every module quantized in both of two NVFP4 checkpoints, tensor by tensor.

    Args:
        a, b: the checkpoint directories.
        tensor: an fnmatch pattern; only modules it matches are compared.
        source: the unquantized source checkpoint; each module's dequantized weights are then measured
            against it (relative MSE and SNR).

    Returns:
        Shapes, identical packed bytes and block scales, equal global and input scales per module, and the
        tensors and quantized modules found in only one of the two.

    Raises:
        CheckpointError: a tensor's bytes cannot be read, or ``source`` is not a safetensors checkpoint.
    """
    ca, cb = NVFP4Checkpoint(a), NVFP4Checkpoint(b)
    result = WeightComparison(str(ca.root), str(cb.root))
    src_index = build_index(source) if source else None
    src_reader = TensorReader(source) if source else None
    try:
        result.only_a = sorted(set(ca.tensors) - set(cb.tensors))
        result.only_b = sorted(set(cb.tensors) - set(ca.tensors))
        qa = {n for n, v in ca.modules.items() if v.quantized}
        qb = {n for n, v in cb.modules.items() if v.quantized}
        result.quantized_only_a, result.quantized_only_b = sorted(qa - qb), sorted(qb - qa)
        for name in sorted(qa & qb):
            if tensor and not fnmatch.fnmatchcase(name, tensor):
                continue
            va, vb = ca.modules[name], cb.modules[name]
            wa, wb = ca.read(va.weight), cb.read(vb.weight)
            shape_match = wa.shape == wb.shape
            share = float((wa == wb).double().mean()) if shape_match else 0.0
            sa = ca.read(va.weight_scale).view(torch.uint8) if va.weight_scale else None
            sb = cb.read(vb.weight_scale).view(torch.uint8) if vb.weight_scale else None
            scales_equal = sa is not None and sb is not None and sa.shape == sb.shape and torch.equal(sa, sb)
            g_a, g_b = ca.weight_scale_2(va), cb.weight_scale_2(vb)
            if va.input_scale is None and vb.input_scale is None:
                inp = "absent"
            elif va.input_scale is None or vb.input_scale is None:
                inp = "only in B" if va.input_scale is None else "only in A"
            else:
                inp = "equal" if ca.scalar_bits(va.input_scale) == cb.scalar_bits(vb.input_scale) else "differs"
            cmp = ModuleComparison(
                name,
                shape_match,
                share,
                scales_equal,
                g_a is not None and g_a == g_b,
                inp,
                (wa.reshape(-1)[:20].tolist(), wb.reshape(-1)[:20].tolist()),
            )
            if src_index is not None and f"{name}.weight" in src_index:
                w = src_reader.read(src_index[f"{name}.weight"])
                cmp.error_a, cmp.error_b = _error(ca, va, w), _error(cb, vb, w)
            result.modules.append(cmp)
    finally:
        ca.close()
        cb.close()
        if src_reader:
            src_reader.close()
    return result


def text(r: WeightComparison) -> str:
    d = r.as_dict()
    n = d["compared"]
    lines = [f"A: {r.a}", f"B: {r.b}", f"Modules quantized in both: {n}"]
    if r.modules:
        m = next((x for x in r.modules if not x.identical), r.modules[0])
        lines += [
            f"Example {m.name}:",
            f"  first 20 packed values A: {m.first_bytes[0]}",
            f"  first 20 packed values B: {m.first_bytes[1]}",
        ]
    lines += [
        f"{'✅' if d['identical'] == n else '❌'} identical modules (packed bytes, block scales, weight_scale_2): "
        f"{d['identical']}/{n}",
        f"  packed bytes identical: {100 * d['packed_bytes_identical_share']:.4f}% (mean over modules)",
        f"  block scales identical: {d['block_scales_identical']}/{n}",
        f"  weight_scale_2 equal:   {d['weight_scale_2_equal']}/{n}",
        f"  input_scale: {d['input_scale']}",
    ]
    if d["input_scale"].get("differs"):
        lines.append("  ⚠️ input_scale differs: expected between a calibrated and an uncalibrated checkpoint")
    for label, key in (
        ("tensors only in A", "tensors_only_in_a"),
        ("tensors only in B", "tensors_only_in_b"),
        ("quantized only in A", "quantized_only_in_a"),
        ("quantized only in B", "quantized_only_in_b"),
    ):
        if d[key]:
            lines.append(f"  {label}: {len(d[key])}, e.g. {d[key][:3]}")
    if d["differing_modules"]:
        lines.append(f"  differing modules, first: {d['differing_modules'][:5]}")
    for kind, e in d.get("quantization_error_by_kind", {}).items():
        lines.append(
            f"  error vs source [{kind}]: A rel MSE {e['a_rel_mse']:.3e} ({e['a_snr_db']:.2f} dB), "
            f"B rel MSE {e['b_rel_mse']:.3e} ({e['b_snr_db']:.2f} dB)"
        )
    return "\n".join(lines)
