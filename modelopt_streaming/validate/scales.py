"""``compare-scales``: distributions of global, block and input scales, by module kind."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelopt_streaming.plan.names import KIND_ORDER, module_kind
from modelopt_streaming.validate.checkpoint import NVFP4Checkpoint

TYPICAL_WEIGHT_SCALE_2 = (1e-5, 1e-3)
# Every finite non-negative float8_e4m3fn value, indexed by its bit pattern: block-scale statistics are
# exact from a 128-bin histogram of the magnitude bits.
_E4M3_VALUES = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
_E4M3_VALUES[127] = 0.0  # the NaN pattern; its count is reported apart and kept out of the moments


@dataclass
class Distribution:
    values: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        if not self.values:
            return {"count": 0}
        t = torch.tensor(self.values, dtype=torch.float64)
        q = torch.quantile(t, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
        return {
            "count": len(self.values),
            "min": t.min().item(),
            "max": t.max().item(),
            "mean": t.mean().item(),
            "std": t.std(unbiased=False).item(),
            "p1": q[0],
            "p50": q[1],
            "p99": q[2],
        }


@dataclass
class Histogram:
    """Block scales as counts per E4M3 magnitude code (NaN code 127 counted apart)."""

    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(128, dtype=torch.int64))

    def add(self, raw: torch.Tensor) -> None:
        self.counts += torch.bincount((raw.view(torch.uint8).reshape(-1) & 0x7F).long(), minlength=128)

    def summary(self) -> dict:
        counts = self.counts.clone()
        nan = int(counts[127])
        counts[127] = 0
        n = int(counts.sum())
        if not n:
            return {"count": 0, "nan": nan}
        vals = _E4M3_VALUES
        mean = float((counts * vals).sum() / n)
        std = math.sqrt(max(0.0, float((counts * vals**2).sum() / n) - mean**2))
        cdf = torch.cumsum(counts, 0)

        def pct(p: float) -> float:
            return float(vals[int(torch.searchsorted(cdf, torch.tensor(math.ceil(p * n))))])

        nz = torch.nonzero(counts).reshape(-1)
        return {
            "count": n,
            "min": float(vals[nz[0]]),
            "max": float(vals[nz[-1]]),
            "mean": mean,
            "std": std,
            "p1": pct(0.01),
            "p50": pct(0.5),
            "p99": pct(0.99),
            "zero": int(counts[0]),
            "nan": nan,
        }

    def probabilities(self) -> torch.Tensor:
        c = self.counts[:127].double()
        return c / c.sum() if c.sum() else c


@dataclass
class ScaleStats:
    path: str
    global_scales: dict[str, Distribution] = field(default_factory=dict)
    input_scales: dict[str, Distribution] = field(default_factory=dict)
    block_scales: dict[str, Histogram] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "weight_scale_2": {k: v.summary() for k, v in _ordered(self.global_scales)},
            "weight_scale": {k: v.summary() for k, v in _ordered(self.block_scales)},
            "input_scale": {k: v.summary() for k, v in _ordered(self.input_scales)},
        }


def _ordered(d: dict) -> list:
    return sorted(d.items(), key=lambda kv: KIND_ORDER.index(kv[0]) if kv[0] in KIND_ORDER else 99)


def collect(path: str | Path, block_scales: bool = True) -> ScaleStats:
    """The distributions of one NVFP4 checkpoint's scales, by module kind (``plan.names.module_kind``).

    Args:
        path: the checkpoint directory (ModelOpt or compressed-tensors; reciprocal global and input scales of
            the latter are turned back into ModelOpt's convention).
        block_scales: also histogram every fp8 block scale (reads all ``weight_scale`` data).

    Returns:
        ``weight_scale_2``, ``input_scale`` and (optionally) decoded block-scale distributions.

    Raises:
        CheckpointError: a tensor's bytes cannot be read.
    """
    ck = NVFP4Checkpoint(path)
    stats = ScaleStats(str(ck.root))
    try:
        for v in sorted(ck.modules.values(), key=lambda v: v.name):
            if not v.quantized:
                continue
            kind = module_kind(v.name)
            ws2 = ck.weight_scale_2(v)
            if ws2 is not None:
                stats.global_scales.setdefault(kind, Distribution()).values.append(ws2)
            if v.input_scale is not None:
                value = float(ck.read(v.input_scale).float().reshape(-1)[0])
                if ck.format == "compressed-tensors":
                    value = 1.0 / value if value else math.inf
                stats.input_scales.setdefault(kind, Distribution()).values.append(value)
            if block_scales and v.weight_scale is not None and v.weight_scale.dtype == "F8_E4M3":
                stats.block_scales.setdefault(kind, Histogram()).add(ck.read(v.weight_scale))
    finally:
        ck.close()
    return stats


def ks_distance(a: list[float], b: list[float]) -> float:
    """Kolmogorov-Smirnov statistic between two samples (0: same distribution, 1: disjoint)."""
    if not a or not b:
        return float("nan")
    ta, tb = torch.tensor(sorted(a), dtype=torch.float64), torch.tensor(sorted(b), dtype=torch.float64)
    grid = torch.cat([ta, tb])
    fa = torch.searchsorted(ta, grid, right=True).double() / len(ta)
    fb = torch.searchsorted(tb, grid, right=True).double() / len(tb)
    return float((fa - fb).abs().max())


def total_variation(a: Histogram, b: Histogram) -> float:
    return float(0.5 * (a.probabilities() - b.probabilities()).abs().sum())


def compare(a: ScaleStats, b: ScaleStats | None) -> dict:
    """``a``'s statistics as a dict (``"a"``), and with ``b`` also ``b``'s and their distances by kind:
    Kolmogorov-Smirnov over ``weight_scale_2``, total variation over block-scale histograms."""
    out = {"a": a.as_dict()}
    if b is not None:
        out["b"] = b.as_dict()
        out["distance"] = {
            "weight_scale_2_ks": {
                k: ks_distance(a.global_scales[k].values, b.global_scales[k].values)
                for k in a.global_scales
                if k in b.global_scales
            },
            "weight_scale_tv": {
                k: total_variation(a.block_scales[k], b.block_scales[k]) for k in a.block_scales if k in b.block_scales
            },
        }
    return out


def _fmt(s: dict) -> str:
    if not s.get("count"):
        return "  (none)"
    return (
        f"  Count: {s['count']}\n  Min:   {s['min']:.6e}\n  Max:   {s['max']:.6e}\n  Mean:  {s['mean']:.6e}\n"
        f"  Std:   {s['std']:.6e}\n  p1/p50/p99: {s['p1']:.3e} / {s['p50']:.3e} / {s['p99']:.3e}"
    )


def text(result: dict) -> str:
    lines = []
    for label in ("a", "b"):
        if label not in result:
            continue
        r = result[label]
        lines.append(f"== {r['path']}")
        for kind, s in r["weight_scale_2"].items():
            lines.append(f"weight_scale_2 (global, float32 scalar) [{kind}]:\n{_fmt(s)}")
            lo, hi = TYPICAL_WEIGHT_SCALE_2
            if s.get("count") and (s["min"] < lo or s["max"] > hi):
                lines.append(f"  note: outside the typical range [{lo:g}, {hi:g}]")
        for kind, s in r["weight_scale"].items():
            lines.append(
                f"weight_scale (per-block, fp8 decoded) [{kind}]:\n{_fmt(s)}"
                + (f"\n  zero: {s.get('zero', 0)}, NaN: {s.get('nan', 0)}" if s.get("count") else "")
            )
        for kind, s in r["input_scale"].items():
            lines.append(f"input_scale (activation, scalar) [{kind}]:\n{_fmt(s)}")
        lines.append("")
    if "distance" in result:
        lines.append("Distance between A and B (0 = same distribution):")
        for kind, d in result["distance"]["weight_scale_2_ks"].items():
            lines.append(f"  weight_scale_2 [{kind}] Kolmogorov-Smirnov: {d:.4f}")
        for kind, d in result["distance"]["weight_scale_tv"].items():
            lines.append(f"  weight_scale [{kind}] total variation: {d:.4f}")
    return "\n".join(lines)


def plot(a: ScaleStats, b: ScaleStats | None, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for stats, style in ((a, "-"), (b, "--")):
        if stats is None:
            continue
        for kind, dist in _ordered(stats.global_scales):
            vals = [math.log10(v) for v in dist.values if v > 0]
            axes[0].hist(vals, bins=50, histtype="step", linestyle=style, label=f"{Path(stats.path).name} {kind}")
        for kind, hist in _ordered(stats.block_scales):
            p = hist.probabilities()
            axes[1].plot(
                _E4M3_VALUES[:127].clamp(min=2**-10).log2().numpy(),
                p.numpy(),
                style,
                label=f"{Path(stats.path).name} {kind}",
            )
    lo, hi = TYPICAL_WEIGHT_SCALE_2
    axes[0].axvspan(math.log10(lo), math.log10(hi), color="green", alpha=0.08, label="typical range")
    axes[0].set_xlabel("log10 weight_scale_2")
    axes[0].set_ylabel("modules")
    axes[1].set_xlabel("log2 weight_scale (fp8 block scale)")
    axes[1].set_ylabel("share of blocks")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
