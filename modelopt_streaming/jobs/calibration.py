"""Calibration for a quantize run: the calibration data loaded and checked, the engine run over it layer by
layer with a progress bar, and the measured maxima turned into the scales ModelOpt's export writes
(``input_scale = amax / (6 * 448)``, the CUDA or CPU form as ``--scale_math`` says)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from modelopt_streaming import faults
from modelopt_streaming.codec import nvfp4
from modelopt_streaming.engine.calibrate import Boundary, Calibration, calibrate
from modelopt_streaming.engine.data import CalibrationData, load_calibration_data
from modelopt_streaming.engine.hidden import HiddenStore
from modelopt_streaming.engine.model import family_of_config, text_config_dict
from modelopt_streaming.engine.runner import EngineOptions
from modelopt_streaming.errors import UsageError
from modelopt_streaming.formats.nvfp4 import E4M3_MAX
from modelopt_streaming.jobs.distributed import batch_share
from modelopt_streaming.sink.writer import write_json_atomic
from modelopt_streaming.source.index import CheckpointIndex
from modelopt_streaming.source.reader import TensorReader

__all__ = ["CalibrationRun", "calibration_key", "load_data", "run_calibration"]

_log = logging.getLogger(__name__)


@dataclass
class CalibrationRun:
    """What a quantize run's calibration measured and what it writes."""

    data: CalibrationData
    calibration: Calibration
    input_scales: dict[str, float]  # quantized module -> input_scale
    kv_scales: dict[str, float]  # "...self_attn.k_proj.k_scale" / "...v_proj.v_scale" -> value (--kv_cache fp8)
    engine: dict  # how the engine ran (device, dtype, attention, batch size): other settings give other bits
    bytes_read: int = 0  # source bytes the calibration read (0 when a kept result was used)

    def report(self) -> dict:
        """For the summary, ``--json`` and the provenance: the data's fingerprint, tokens per expert and the
        experts that saw none (they still get the layer's shared value, as ModelOpt writes them)."""
        return {
            "data": self.data.as_dict(),
            "engine": self.engine,
            "tokens": self.calibration.tokens,
            "tokens_per_expert": self.calibration.expert_tokens,
            "experts_without_tokens": self.calibration.experts_without_tokens(),
            **({"kv_scales": len(self.kv_scales)} if self.kv_scales else {}),
        }


def load_data(index: CheckpointIndex, options) -> CalibrationData:
    """The calibration rows of ``options.calib_data``, checked before any other work; also refuses an
    architecture the engine does not run."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError(
            "--calib_data runs the model with transformers: pip install 'modelopt-streaming[calib]'"
        ) from None
    family_of_config(index.config, str(index.root))
    text, _ = text_config_dict(index.config)
    vocab = text.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise UsageError(f"{index.root / 'config.json'}: no vocab_size to check the calibration token ids against")
    return load_calibration_data(
        options.calib_data,
        index.root,
        vocab_size=vocab,
        size=options.calib_size,
        seq_len=options.calib_seq_len,
        trust_remote_code=options.trust_remote_code,
    )


def calibration_key(data: CalibrationData, options, device: torch.device, weights=None) -> str:
    """What a calibrated run's scales depend on besides the source and the recipe: the rows (their digest),
    how the engine runs (the bits of a forward differ between devices, dtypes, attention implementations
    and batch compositions) and what is measured. The resume fingerprint holds it. ``device``: the resolved
    one (``jobs.quantize.resolve_device``), never re-derived here. ``weights``: the settings of a weight
    quantization run inside the pass (``jobs.gptq.GptqSettings``), whose ``key()`` joins it."""
    settings = {
        "data": data.fingerprint,
        "device": device.type,
        "batch_size": options.calib_batch_size,
        "kv_cache": options.kv_cache,
        # Only when not the default, so that the keys of earlier bf16 runs stay valid for --resume.
        **({"dtype": options.calib_dtype} if options.calib_dtype != "bfloat16" else {}),
        **({"weights": weights.key()} if weights is not None else {}),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# A calibration keeps a boundary (the hidden states of its rows between two layers, and what the layers so far
# measured) at most this often: saving one writes every row's hidden state (512 x 2048 tokens of DeepSeek-V3:
# 15 GB), so a run keeps one every few minutes, not every layer. Resuming from any boundary gives the same
# values; the tests set 0 to keep one after every layer.
CHECKPOINT_ENV = "MODELOPT_STREAMING_CALIBRATION_CHECKPOINT_S"
CHECKPOINT_S = 600.0


def run_calibration(
    index: CheckpointIndex,
    data: CalibrationData,
    options,
    device: torch.device,
    threads: int,
    state_dir: Path | None = None,
    rank: int = 0,
    world: int = 1,
    on_live: Callable[[str, dict[str, torch.Tensor], dict[str, float]], None] | None = None,
    weights=None,
) -> CalibrationRun:
    """Run the calibration rows through the source model one layer at a time (``engine.calibrate``).

    With ``state_dir`` (the output directory's records) the run keeps boundaries there and continues from the
    last one a previous run kept, and keeps its result, which a resumed run reads instead of calibrating
    again. Under torchrun (``world`` > 1) each rank runs its share of the batches (whole batches, so every
    row meets the same batch as in one process) and the ranks reduce the maxima with max and the token
    counts with sum: the scales are those of one process. ``on_live(module, tensors, input_scales)`` (one
    process) is called while each module is on the device, with the input scales measured so far.

    ``weights`` (``jobs.gptq.GptqUnits``): a weight quantization run inside the pass (its ``solver()``), whose
    settings join the key, and which keeps what a resume needs beside each boundary (``save``) and writes it
    back first on a resumed run (``restore``). Under torchrun every rank then runs every row.

    Raises:
        UsageError, CheckpointError: as ``engine.calibrate``.
    """
    engine = EngineOptions(
        device=device,
        dtype=getattr(torch, options.calib_dtype),
        batch_size=options.calib_batch_size,
        trust_remote_code=options.trust_remote_code,
        device_budget_bytes=_device_budget(options.calib_device_budget, device),
        read_threads=threads,
    )
    key = calibration_key(data, options, device, weights.settings if weights is not None else None)
    if weights is not None:
        # Every rank runs every row: Hessians summed across ranks would not be those of one process (float sums
        # are not associative); the ranks split the layer's solves instead (jobs.gptq).
        world = 1
    mine = _share(data.input_ids, options.calib_batch_size, rank, world)
    keep = _Keeper(state_dir / f"rank{rank}" if state_dir is not None else None, key, world, mine.shape)
    if weights is not None:
        keep.on_keep = lambda directory: weights.save(directory, key)
        weights.restore(keep.dir, key)
    calibration, bytes_reader = keep.result(), None
    if calibration is None:
        bar = _LayerProgress(data.input_ids.numel(), options.progress)

        scales: dict[str, float] = {}

        def live(module: str, views: dict[str, torch.Tensor], measured: Calibration) -> None:
            for name, amax in measured.input_amax.items():
                if name not in scales:
                    scales[name] = _input_scale(amax, options.scale_math)
            on_live(module, views, {} if options.weight_only else scales)

        def on_layer(boundary: Boundary, layers: int) -> None:
            bar.advance(boundary, layers)
            keep.boundary(boundary)
            faults.point("layer")

        try:
            with TensorReader(index.root, threads=threads) as reader:
                bytes_reader = reader
                calibration = calibrate(
                    index,
                    reader,
                    mine,
                    engine,
                    kv=options.kv_cache == "fp8",
                    on_layer=on_layer,
                    resume=keep.last_boundary(engine.dtype, index),
                    on_live=live if on_live is not None and world == 1 else None,
                    solver=weights.solver() if weights is not None else None,
                    host_budget_bytes=options.calib_host_budget,
                )
        finally:
            bar.close()
        keep.finish(calibration)
    if world > 1:
        calibration = _reduce(calibration)
    scales = {module: _input_scale(amax, options.scale_math) for module, amax in calibration.input_amax.items()}
    # ModelOpt's export: k_bmm_quantizer amax / 448 as ``<attention>.k_proj.k_scale`` (v likewise), float32, no
    # clamp (export/quant_utils.py _KV_CACHE_REPLACEMENTS; unified_export_hf.py kv_cache_max_bound = 448).
    kv_scales = {}
    for attention, (k, v) in calibration.kv_amax.items():
        kv_scales[f"{attention}.k_proj.k_scale"] = _over_e4m3_max(k, options.scale_math)
        kv_scales[f"{attention}.v_proj.v_scale"] = _over_e4m3_max(v, options.scale_math)
    settings = {
        "device": device.type,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "attention": engine.attn_implementation,
        "batch_size": engine.batch_size,
    }
    read = bytes_reader.bytes_read if bytes_reader is not None else 0
    return CalibrationRun(data, calibration, scales, kv_scales, settings, read)


def _device_budget(asked: int | None, device: torch.device) -> int | None:
    """The bytes a layer may take on the device: as asked, or on a GPU its free memory less 10 GiB for the
    hidden states of a batch and the codec's scratch."""
    if asked is not None or device.type != "cuda":
        return asked
    free, _total = torch.cuda.mem_get_info(device)
    return max(0, free - 10 * 1024**3)


def _share(input_ids: torch.Tensor, batch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows: batches rank, rank + world, ... of the rows cut into batches of ``batch``."""
    if world == 1:
        return input_ids
    batches = [input_ids[start : start + rows] for start, rows in batch_share(len(input_ids), batch, rank, world)]
    return torch.cat(batches) if batches else input_ids[:0]


def _reduce(calibration: Calibration) -> Calibration:
    """Every rank's statistics combined on every rank: maxima by max (exact), token counts by sum."""
    import torch.distributed as dist

    parts: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, calibration.as_json())
    merged = Calibration()
    for part in map(Calibration.from_json, parts):
        for name, value in part.input_amax.items():
            merged.input_amax[name] = max(merged.input_amax.get(name, value), value)
        for name, (k, v) in part.kv_amax.items():
            old = merged.kv_amax.get(name, (k, v))
            merged.kv_amax[name] = (max(old[0], k), max(old[1], v))
        for name, counts in part.expert_tokens.items():
            old = merged.expert_tokens.get(name, [0] * len(counts))
            merged.expert_tokens[name] = [a + b for a, b in zip(old, counts)]
        merged.tokens += part.tokens
    return merged


class _Keeper:
    """A rank's calibration state in the output directory: the last boundary kept (``boundary.json`` and the
    hidden states ``hidden.bin``) and the finished result (``result.json``), each tied to the calibration key
    and the world size by which the rows were shared. Files are written under a temporary name and renamed."""

    def __init__(self, directory: Path | None, key: str, world: int, rows: torch.Size):
        self.dir, self.key, self.world, self.rows = directory, key, world, tuple(rows)
        self.every = float(os.environ.get(CHECKPOINT_ENV, CHECKPOINT_S))
        self._last = time.monotonic()
        # Called with the directory before a boundary or the result is recorded: what else a resume needs.
        self.on_keep: Callable[[Path], None] | None = None

    def _read(self, name: str) -> dict | None:
        if self.dir is None or not (self.dir / name).is_file():
            return None
        try:
            data = json.loads((self.dir / name).read_text())
        except ValueError:
            return None
        if data.get("key") != self.key or data.get("world") != self.world or tuple(data.get("rows", ())) != self.rows:
            return None
        return data

    def result(self) -> Calibration | None:
        data = self._read("result.json")
        return Calibration.from_json(data["calibration"]) if data else None

    def last_boundary(self, dtype: torch.dtype, index: CheckpointIndex) -> Boundary | None:
        data = self._read("boundary.json")
        if data is None or not (self.dir / "hidden.bin").is_file():
            return None
        text, _ = text_config_dict(index.config)
        hidden = HiddenStore.open(self.dir / "hidden.bin", self.rows[0], (self.rows[1], text["hidden_size"]), dtype)
        _log.info(f"calibrate: resuming after layer {data['layers_done']}")
        return Boundary(data["layers_done"], Calibration.from_json(data["calibration"]), hidden)

    def boundary(self, boundary: Boundary) -> None:
        if self.dir is None or time.monotonic() - self._last < self.every:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        partial = self.dir / ".hidden.bin.partial"
        boundary.hidden.save(partial)
        # The old record goes first: a kill between the two renames must not pair it with the new hidden states.
        (self.dir / "boundary.json").unlink(missing_ok=True)
        os.replace(partial, self.dir / "hidden.bin")
        if self.on_keep is not None:
            self.on_keep(self.dir)
        record = {"layers_done": boundary.layers_done, "calibration": boundary.calibration.as_json()}
        self._write("boundary.json", record)
        self._last = time.monotonic()

    def finish(self, calibration: Calibration) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.on_keep is not None:
            self.on_keep(self.dir)
        self._write("result.json", {"calibration": calibration.as_json()})
        (self.dir / "hidden.bin").unlink(missing_ok=True)

    def _write(self, name: str, record: dict) -> None:
        write_json_atomic(self.dir / name, {"key": self.key, "world": self.world, "rows": list(self.rows), **record})


def _input_scale(amax: float, scale_math: str) -> float:
    """ModelOpt's ``input_scale = amax / (6 * 448)``, in the form ``--scale_math`` names (as weight_scale_2)."""
    return float(nvfp4.weight_scale_2_from_amax(torch.tensor(amax, dtype=torch.float32), scale_math))


def _over_e4m3_max(amax: float, scale_math: str) -> float:
    """amax / 448 as ModelOpt's export computes it: a float32 division on the CPU; on CUDA torch divides a
    tensor by a scalar as a multiplication by its float32 reciprocal (the same form as ``weight_scale_2``)."""
    value = torch.tensor(amax, dtype=torch.float32)
    if scale_math == "cpu":
        return float(value / E4M3_MAX)
    return float(value * torch.tensor(1.0 / E4M3_MAX, dtype=torch.float32))


class _LayerProgress:
    """Layers done of the model's, with tokens per second and the time left: a bar on a terminal, log lines
    otherwise, nothing with ``progress="none"``."""

    def __init__(self, tokens: int, mode: str):
        self.tokens, self.started = tokens, time.monotonic()
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self._bar = mode, None

    def advance(self, boundary: Boundary, layers: int) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.tokens * boundary.layers_done / layers / max(elapsed, 1e-9)  # model-tokens per second
        if self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=layers, unit="layer", desc="calibrate")
            self._bar.update(1)
            self._bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        elif self.mode == "log":
            eta = elapsed / boundary.layers_done * (layers - boundary.layers_done)
            _log.info(f"calibrate: layer {boundary.layers_done}/{layers}, {rate:.0f} tokens/s, ETA {eta:.0f} s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
