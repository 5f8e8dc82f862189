"""What a quantize run tells its caller: the plan's counts, module by module (``--json``), and the run's
times and findings; the text lines ``--dry_run`` and a finished run print."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelopt_streaming.codec import nvfp4
from modelopt_streaming.formats.interchange import COMPRESSED_TENSORS
from modelopt_streaming.plan.build import CopyUnit, Plan, QuantizeUnit

__all__ = ["Summary", "plan_details", "summarize"]


@dataclass
class Summary:
    input_dir: str
    output_dir: str | None
    quantized_weights: int
    quantized_by_kind: dict[str, int]
    fused_groups: dict[str, int]
    copied_tensors: int
    unquantized_modules: int
    unquantized_by_reason: dict[str, int]
    input_bytes: int
    output_bytes: int
    shards: int
    exclude_modules: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stages: str = ""
    # Seconds of each phase of the run on this process, in order (index and plan, prepare, stream, the
    # torchrun waits and exchanges, export): what a fixed cost is, apart from what grows with the model.
    phases: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Quantized modules whose weight (or whole fused group) was all zeros: written as exact zeros with a
    # finite global scale, where ModelOpt writes NaN (docs/codec.md). Known after the run.
    zero_weights: list[str] = field(default_factory=list)
    format: str = "modelopt"
    # How block scales were chosen (--algorithm) and its settings (codec.algorithm_settings).
    algorithm: str = "rtn"
    algorithm_settings: dict = field(default_factory=dict)
    # --input_scales_from: quantized modules the reference gives no input scale for (they keep 1.0).
    input_scales_missing: list[str] = field(default_factory=list)
    # --calib_data: the data's fingerprint, how the engine ran, tokens per expert, experts that saw none.
    calibration: dict = field(default_factory=dict)
    # Tensor bytes this process read from the source, the calibration's reads included: a calibrated run
    # quantizes each layer from the tensors its forward read, so this stays at one read of what it writes.
    source_bytes_read: int = 0
    # The plan module by module (--json): quantized modules by kind, unquantized by reason, fused groups.
    plan: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        gb = 1e9
        kinds = ", ".join(f"{k} {v}" for k, v in self.quantized_by_kind.items())
        settings = ", ".join(f"{k} {v}" for k, v in self.algorithm_settings.items())
        out = [
            f"quantize: {self.quantized_weights} weights" + (f" ({kinds})" if kinds else ""),
            f"algorithm: {self.algorithm}" + (f" ({settings})" if settings else ""),
            "fused groups: " + (", ".join(f"{k}: {v}" for k, v in self.fused_groups.items()) or "none"),
            f"copy: {self.copied_tensors} tensors unchanged",
            f"unquantized Linear modules: {self.unquantized_modules}",
        ]
        out += [f"  {reason}: {n}" for reason, n in self.unquantized_by_reason.items()]
        if self.zero_weights:
            shown = ", ".join(self.zero_weights[:6]) + (" ..." if len(self.zero_weights) > 6 else "")
            out.append(
                f"all-zero weights: {len(self.zero_weights)}, written as exact zeros with weight_scale_2 "
                f"{nvfp4.ZERO_WEIGHT_SCALE_2} (ModelOpt would write NaN scales): {shown}"
            )
        if self.calibration:
            data, idle = self.calibration["data"], self.calibration["experts_without_tokens"]
            out.append(
                f"calibration: {data['rows']} x {data['seq_len']} tokens of {data['source']} (sha256 "
                f"{data['sha256'][:12]}), on {self.calibration['engine']['device']}"
            )
            out.append(
                f"  source read: {self.source_bytes_read / 1e9:.3f} GB of {self.input_bytes / 1e9:.3f} GB planned "
                "(each layer quantized from the tensors its forward read)"
            )
            if idle:
                n = sum(len(v) for v in idle.values())
                out.append(
                    f"  experts that saw no token: {n} in {len(idle)} layers (they get the layer's shared value)"
                )
            weights = self.calibration.get("weights")
            if weights:
                few = sum(len(v) for v in weights["experts_few_tokens_mse"].values())
                out.append(
                    f"  weights: {weights['algorithm']} over {weights['scales']} scales"
                    + (" (act order)" if weights.get("act_order") else "")
                    + (", sequential" if weights.get("sequential") else "")
                    + f"; mse for {few} experts under {weights['min_expert_tokens']} tokens, "
                    f"{len(weights['gptq_not_better'])} weights where another encoding was better on the calibration "
                    f"inputs, {len(weights['units_not_solved'])} units no layer held"
                )
        if self.input_scales_missing:
            shown = ", ".join(self.input_scales_missing[:6]) + (" ..." if len(self.input_scales_missing) > 6 else "")
            where = "calibration" if self.calibration else "reference"
            out.append(
                f"input scales: {len(self.input_scales_missing)} quantized modules not in the {where} keep 1.0: {shown}"
            )
        if self.exclude_modules:
            key = "ignore" if self.format == COMPRESSED_TENSORS else "exclude_modules"
            shown = ", ".join(self.exclude_modules[:12]) + (" ..." if len(self.exclude_modules) > 12 else "")
            out.append(f"{key} ({len(self.exclude_modules)} entries): {shown}")
        out.append(
            f"output: {self.shards} shard(s), {self.output_bytes / gb:.3f} GB (input {self.input_bytes / gb:.3f} GB)"
        )
        if self.seconds:
            rate = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
            out.append(
                f"time: {self.seconds:.1f} s, {rate:.0f} MB/s of input"
                + (f" (busy stages: {self.stages})" if self.stages else "")
            )
        if self.phases:
            out.append("phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items()))
        return out


def summarize(plan: Plan, input_dir: Path, output_dir: Path | None) -> Summary:
    return Summary(
        input_dir=str(input_dir),
        output_dir=str(output_dir) if output_dir else None,
        quantized_weights=len(plan.quantized),
        quantized_by_kind=plan.quantized_kind_counts(),
        fused_groups=plan.fused_group_counts(),
        copied_tensors=sum(isinstance(u, CopyUnit) for u in plan.units),
        unquantized_modules=len(plan.unquantized),
        unquantized_by_reason=plan.unquantized_reason_counts(),
        input_bytes=plan.input_bytes,
        output_bytes=plan.output_bytes,
        shards=len(plan.shards),
        warnings=list(plan.warnings),
        format=plan.recipe.format,
        algorithm=plan.recipe.algorithm,
        algorithm_settings=dict(plan.recipe.algorithm_settings),
        plan=plan_details(plan),
    )


def plan_details(plan: Plan) -> dict:
    """Every module of the plan by what happens to it, and the shards (what --json prints)."""
    quantized: dict[str, list[str]] = {}
    for module, kind in sorted(plan.quantized.items()):
        quantized.setdefault(kind, []).append(module)
    unquantized: dict[str, list[str]] = {}
    for module, reason in plan.unquantized.items():
        unquantized.setdefault(reason, []).append(module)
    fused: dict[str, list[list[str]]] = {}
    for unit in plan.units:
        if isinstance(unit, QuantizeUnit) and unit.fusion:
            fused.setdefault(unit.fusion, []).append(list(unit.modules))
    return {
        "quantized_by_kind": quantized,
        "unquantized_by_reason": unquantized,
        "fused_groups": fused,
        "shards": [{"file": s.file, "bytes": s.nbytes, "tensors": len(s.outputs)} for s in plan.shards],
    }
