"""What ``validate`` reports: fused-group statistics, the findings and the verdict, as text or JSON."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from modelopt_streaming.validate.checkpoint import Finding

MAX_LISTED = 10


@dataclass
class GroupStats:
    """The quantized fused groups of one kind (q/k/v, gate/up, ...) and how many share their scales bit for bit."""

    kind: str
    total: int = 0
    matched: int = 0
    mismatched: list[str] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # second member's weight_scale_2 / first's, mismatches
    input_mismatched: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.total == 0 or self.matched == self.total:
            return "perfect"
        return "acceptable" if self.matched / self.total > 0.99 else "broken"

    def as_dict(self) -> dict:
        d = {
            "kind": self.kind,
            "total": self.total,
            "matched": self.matched,
            "mismatched": self.total - self.matched,
            "verdict": self.verdict,
            "first_mismatched": self.mismatched[:MAX_LISTED],
            "input_scale_mismatched": len(self.input_mismatched),
        }
        if self.ratios:
            d["ratio"] = {"min": min(self.ratios), "median": statistics.median(self.ratios), "max": max(self.ratios)}
        return d


@dataclass
class Report:
    """What ``validate`` found in one checkpoint: counts, fused-group statistics and every finding."""

    path: str
    format: str | None
    quant_algo: str | None
    shards: int
    tensors: int
    quantized_modules: int
    unquantized_linear: int
    groups: dict[str, GroupStats]
    block_scales: dict[str, int]
    findings: list[Finding]
    # Input dim of every quantized row-parallel module: what tensor parallelism splits.
    row_parallel_in: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def tp_misfits(self, tp: int) -> list[str]:
        """Row-parallel modules whose per-rank input slice at this TP is not a multiple of 16."""
        return [m for m, d in self.row_parallel_in.items() if d % tp or (d // tp) % 16]

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "format": self.format,
            "quant_algo": self.quant_algo,
            "shards": self.shards,
            "tensors": self.tensors,
            "quantized_modules": self.quantized_modules,
            "unquantized_linear_modules": self.unquantized_linear,
            "fused_groups": {k: g.as_dict() for k, g in self.groups.items()},
            "block_scales": self.block_scales,
            "findings": [f.as_dict() for f in self.findings],
        }

    def text(self) -> str:
        lines = [
            f"Checkpoint: {self.path}",
            f"  format {self.format or 'unknown'}, quant_algo {self.quant_algo}, {self.shards} shard(s), "
            f"{self.tensors} tensors, {self.quantized_modules} quantized modules, "
            f"{self.unquantized_linear} unquantized Linear modules",
            "",
        ]
        for kind, g in self.groups.items():
            lines.append(f"Fused groups {kind}:")
            lines.append(f"  ✅ Matched pairs: {g.matched}/{g.total}")
            lines.append(f"  {'❌' if g.matched < g.total else '✅'} Mismatched pairs: {g.total - g.matched}/{g.total}")
            if g.ratios:
                lines.append(
                    f"  weight_scale_2 ratio of mismatched pairs: min {min(g.ratios):.4g}, "
                    f"median {statistics.median(g.ratios):.4g}, max {max(g.ratios):.4g}"
                )
                lines += [f"    {name}" for name in g.mismatched[:MAX_LISTED]]
            if g.input_mismatched:
                lines.append(
                    f"  ❌ input_scale differs within {len(g.input_mismatched)} group(s), e.g. {g.input_mismatched[0]}"
                )
            verdict = {
                "perfect": f"✅ ALL {kind.upper()} GROUPS PERFECTLY MATCHED!",
                "acceptable": f"⚠️ {kind} >99% matched: acceptable, vLLM will warn for the rest",
                "broken": f"❌ {kind} <99% matched: expect accuracy loss or kernel failures",
            }[g.verdict]
            lines += [f"  {verdict}", ""]
        if self.block_scales:
            bs = self.block_scales
            lines.append(f"Block scales: {bs.get('total', 0)} read, {bs.get('zero', 0)} zero, {bs.get('nan', 0)} NaN")
        errors = [f for f in self.findings if f.level == "error"]
        warnings = [f for f in self.findings if f.level == "warning"]
        for f in errors:
            lines.append(f"❌ [{f.check}] {f.message}")
        for f in warnings:
            lines.append(f"⚠️ [{f.check}] {f.message}")
        lines.append("")
        lines.append("✅ VALID" if self.ok else f"❌ INVALID: {len(errors)} error(s)")
        return "\n".join(lines)
