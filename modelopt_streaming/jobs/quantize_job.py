"""What one quantize run is made of: the options it was asked for (``QuantizeOptions``, checked together before
any work) and what the run derives from them (``QuantizeJob``: the index, the plan, the output directory's
state, the device, the threads), handed whole to the stages that stream, schedule and export."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelopt_streaming.codec import ALGORITHMS, Codec
from modelopt_streaming.engine.data import CalibrationData
from modelopt_streaming.errors import UsageError
from modelopt_streaming.formats.interchange import FORMATS, RECORD_KEY, ExactReciprocals
from modelopt_streaming.jobs.pipeline import Throughput
from modelopt_streaming.jobs.progress import PROGRESS_MODES, Progress
from modelopt_streaming.jobs.summary import Summary
from modelopt_streaming.plan.build import Plan, Recipe, Shard
from modelopt_streaming.sink.output_dir import OutputState
from modelopt_streaming.source.index import CheckpointIndex, TensorSpec
from modelopt_streaming.source.reader import TensorReader

__all__ = ["WEIGHT_ALGORITHMS", "QuantizeJob", "QuantizeOptions", "shard_specs"]

# --algorithm: the codec's (block scales chosen per weight, data-free) and gptq (needs the calibration's inputs;
# jobs.gptq, which jobs.quantize runs when it is asked for).
WEIGHT_ALGORITHMS = (*ALGORITHMS, "gptq")
CALIB_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class QuantizeOptions:
    """The options of one ``quantize`` run, each checked on construction (UsageError names the CLI option).

    Attributes:
        mlp_only: quantize dense MLPs, shared and routed experts only.
        experts_only: quantize routed experts only (excludes ``mlp_only``).
        exclude: fnmatch patterns of modules left unquantized.
        exclude_config: a reference ``hf_quant_config.json`` or ``config.json`` whose exclusions are reused.
        weight_only: W4A16_NVFP4, no ``input_scale`` tensors.
        scale_math: ``weight_scale_2`` as ModelOpt computes it on ``"cuda"`` (default) or ``"cpu"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; None or ``"auto"``: CUDA when available.
        max_shard_size: largest output shard, in bytes.
        dry_run: plan only, write nothing.
        overwrite: replace an earlier output of this tool.
        resume: continue an interrupted run in the same output directory (excludes ``overwrite``).
        verify: with ``resume``, check finished shards by digest.
        allow_nonfinite: quantize weights holding NaN/Inf instead of refusing.
        progress: ``"auto"`` (a bar on a terminal, else log lines), ``"bar"``, ``"log"`` or ``"none"``.
        format: ``"modelopt"`` or ``"compressed-tensors"``.
        input_scales_from: a reference NVFP4 checkpoint whose ``input_scale`` values are written instead of 1.0.
        io_threads: reader threads and writer threads of this process; None: from the CPUs.
        calib_data: calibration data (a safetensors ``input_ids`` file, JSON Lines, text): the source model is
            run on it one layer at a time and every ``input_scale`` is calibrated as ModelOpt's max
            calibration computes it.
        calib_size: calibration rows to use (default: every row the data gives).
        calib_seq_len: tokens per row for text data (default 2048); token rows are used as given.
        calib_batch_size: rows per forward call (the statistics are batch-independent in ModelOpt's checks;
            the bits of a bf16 forward can differ with the batch, so a reference comparison batches alike).
        trust_remote_code: run the checkpoint's custom tokenizer code for text calibration data.
        kv_cache: an FP8 KV cache: ``"fp8_cast"`` writes the config entries and no scale tensors (ModelOpt's
            constant-amax mode: vLLM uses 1.0); ``"fp8"`` (needs ``calib_data``) also each attention layer's
            calibrated ``k_proj.k_scale`` and ``v_proj.v_scale`` (max |k| / 448, max |v| / 448).
        calib_device_budget: bytes of device memory a decoder layer may take; a larger layer keeps its experts in
            host memory and brings each to the device in its turn (default: the device's free memory less
            10 GiB on a GPU, no limit on the CPU).
        calib_host_budget: bytes of hidden states each of the calibration's two stores (a layer's input and its
            output, every row) keeps in host memory, a memory-mapped file in the temp directory beyond (default: a
            quarter of the memory this process may use, shared by the two, at least 4 GiB each).
        calib_dtype: the dtype the model runs in for calibration: ``"bfloat16"`` (default, what every family
            we run ships in) or ``"float32"`` (a float32 checkpoint run as stored).
        algorithm: how the weights are encoded: ``"rtn"`` (default, ModelOpt's bytes); ``"mse"`` (rtn's scale and
            its neighbours on the E4M3 grid, the smallest squared error wins; codec/mse.py); ``"gptq"`` (needs
            ``calib_data``): fixed block scales (mse's by default), the codes chosen by GPTQ against each Linear's
            calibration inputs, layer by layer (jobs/gptq.py, docs/gptq.md; its settings: ``quantize_gptq``).
    """

    mlp_only: bool = False
    experts_only: bool = False
    exclude: tuple[str, ...] = ()
    exclude_config: str | os.PathLike | None = None
    weight_only: bool = False
    scale_math: str = "cuda"
    device: str | None = None
    max_shard_size: int = 5 * 10**9
    dry_run: bool = False
    overwrite: bool = False
    resume: bool = False
    verify: bool = False
    allow_nonfinite: bool = False
    progress: str = "auto"
    format: str = "modelopt"
    input_scales_from: str | os.PathLike | None = None
    io_threads: int | None = None
    calib_data: str | os.PathLike | None = None
    calib_size: int | None = None
    calib_seq_len: int | None = None
    calib_batch_size: int = 1
    trust_remote_code: bool = False
    kv_cache: str | None = None
    calib_device_budget: int | None = None
    calib_host_budget: int | None = None
    calib_dtype: str = "bfloat16"
    algorithm: str = "rtn"

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.mlp_only and self.experts_only:
            raise UsageError("--mlp_only and --experts_only exclude each other")
        if self.algorithm not in WEIGHT_ALGORITHMS:
            raise UsageError(f"--algorithm must be one of {', '.join(WEIGHT_ALGORITHMS)}, not {self.algorithm!r}")
        if self.algorithm == "gptq" and self.calib_data is None:
            raise UsageError(
                "--algorithm gptq solves each weight against its calibration inputs: it needs --calib_data"
            )
        if self.scale_math not in ("cuda", "cpu"):
            raise UsageError(f"--scale_math must be cuda or cpu, not {self.scale_math!r}")
        if self.max_shard_size <= 0:
            raise UsageError("--max_shard_size must be positive")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.input_scales_from is not None and self.weight_only:
            raise UsageError(
                "--input_scales_from and --weight_only exclude each other (weight-only has no input scales)"
            )
        if self.io_threads is not None and self.io_threads < 1:
            raise UsageError(f"--io_threads must be at least 1, not {self.io_threads}")
        if self.calib_data is None and (
            self.calib_size is not None
            or self.calib_seq_len is not None
            or self.calib_device_budget is not None
            or self.calib_host_budget is not None
            or self.calib_dtype != "bfloat16"
        ):
            raise UsageError(
                "--calib_size, --calib_seq_len, --calib_device_budget, --calib_host_budget and --calib_dtype need "
                "--calib_data"
            )
        if self.calib_dtype not in CALIB_DTYPES:
            raise UsageError(f"--calib_dtype must be one of {', '.join(CALIB_DTYPES)}, not {self.calib_dtype!r}")
        if self.calib_host_budget is not None and self.calib_host_budget < 0:
            raise UsageError(f"--calib_host_budget must not be negative, not {self.calib_host_budget}")
        if self.calib_data is not None and self.input_scales_from is not None:
            raise UsageError("--calib_data and --input_scales_from exclude each other (both give the input scales)")
        if self.calib_data is not None and self.weight_only and self.kv_cache != "fp8" and self.algorithm != "gptq":
            raise UsageError(
                "--calib_data with --weight_only calibrates nothing (no input scales): add --kv_cache fp8 or "
                "--algorithm gptq, or drop it"
            )
        if self.kv_cache not in (None, "fp8", "fp8_cast"):
            raise UsageError(f"--kv_cache must be fp8 or fp8_cast, not {self.kv_cache!r}")
        if self.kv_cache == "fp8" and self.calib_data is None:
            raise UsageError("--kv_cache fp8 measures keys and values: it needs --calib_data (or use fp8_cast)")
        if self.kv_cache and self.format != "modelopt":
            raise UsageError("--kv_cache is written in the ModelOpt format only (--format modelopt)")
        if self.calib_batch_size < 1:
            raise UsageError(f"--calib_batch_size must be at least 1, not {self.calib_batch_size}")
        if self.progress not in PROGRESS_MODES:
            raise UsageError(f"progress must be one of {', '.join(PROGRESS_MODES)}, not {self.progress!r}")
        if self.device not in (None, "auto"):
            # Only the spelling: whether CUDA is there is asked when the run starts writing (a dry run needs
            # no device).
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise UsageError(f"--device {self.device}: {e}") from None

    @property
    def scope(self) -> str:
        return "experts" if self.experts_only else "mlp" if self.mlp_only else "all"


@dataclass
class QuantizeJob:
    """One quantize run once planned: its options and everything derived from them that the writing stages
    share. ``reader``, ``codec`` and ``meter`` exist while the shards stream (set by the runner)."""

    options: QuantizeOptions
    input_dir: Path
    output_dir: Path
    index: CheckpointIndex
    recipe: Recipe
    plan: Plan
    exclude_modules: list[str]
    summary: Summary
    state: OutputState
    fingerprint: dict
    rank: int
    world: int
    device: torch.device
    threads: int
    stats: Throughput = field(default_factory=Throughput)
    # Filled by every unit encoded in the compressed-tensors dialect (interchange.ExactReciprocals).
    reciprocals: ExactReciprocals = field(default_factory=ExactReciprocals)
    reader: TensorReader | None = None
    codec: Codec | None = None
    meter: Progress | None = None
    # --calib_data: the rows, checked before any work; the calibration runs once the directory is prepared.
    calibration_data: CalibrationData | None = None
    # GPTQ of the weights inside the calibration (jobs.gptq.GptqSettings; ``quantize_gptq``); None: round-to-nearest.
    gptq: Any = None

    @property
    def planned(self) -> dict[str, list[str]]:
        """Each planned shard's tensor names, in file order (what the output directory checks a resume by)."""
        return {s.file: [t.name for t in s.outputs] for s in self.plan.shards}

    def finished_record(self, record: dict, reciprocals: dict[str, tuple[int, int]] | None = None) -> dict:
        """A shard's record with the exact-reciprocal entries of its tensors (those of ``reciprocals``, by
        default this process's): kept with the shard, so that a resumed run still knows those of the shards
        a previous run finished."""
        known = self.reciprocals.record if reciprocals is None else reciprocals
        mine = ExactReciprocals()
        mine.record = {n: known[n] for n in record["tensors"] if n in known}
        return {**record, RECORD_KEY: mine.as_json()} if mine.record else record


def shard_specs(shard: Shard) -> list[TensorSpec]:
    """The planned tensors of one output shard, as the writers lay them out."""
    return list(shard.outputs)
