"""Calibration for a quantize run: the calibration data loaded and checked, the engine run over it layer by
layer with a progress bar, and the measured maxima turned into the scales ModelOpt's export writes
(``input_scale = amax / (6 * 448)``, the CUDA or CPU form as ``--scale_math`` says)."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import torch

from modelopt_streaming.codec import nvfp4
from modelopt_streaming.engine.calibrate import Boundary, Calibration, calibrate
from modelopt_streaming.engine.data import CalibrationData, load_calibration_data
from modelopt_streaming.engine.model import family_of_config, text_config_dict
from modelopt_streaming.engine.runner import EngineOptions
from modelopt_streaming.errors import UsageError
from modelopt_streaming.formats.nvfp4 import E4M3_MAX
from modelopt_streaming.source.index import CheckpointIndex
from modelopt_streaming.source.reader import TensorReader

__all__ = ["CalibrationRun", "load_data", "run_calibration"]

_log = logging.getLogger(__name__)


@dataclass
class CalibrationRun:
    """What a quantize run's calibration measured and what it writes."""

    data: CalibrationData
    calibration: Calibration
    input_scales: dict[str, float]  # quantized module -> input_scale
    kv_scales: dict[str, float]  # "...self_attn.k_proj.k_scale" / "...v_proj.v_scale" -> value (--kv_cache fp8)
    engine: dict  # how the engine ran (device, dtype, attention, batch size): other settings give other bits

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


def run_calibration(
    index: CheckpointIndex,
    data: CalibrationData,
    options,
    device: torch.device,
    threads: int,
) -> CalibrationRun:
    """Run the calibration rows through the source model one layer at a time (``engine.calibrate``)."""
    engine = EngineOptions(
        device=device, batch_size=options.calib_batch_size, trust_remote_code=options.trust_remote_code
    )
    bar = _LayerProgress(data.input_ids.numel(), options.progress)
    try:
        with TensorReader(index.root, threads=threads) as reader:
            calibration = calibrate(
                index, reader, data.input_ids, engine, kv=options.kv_cache == "fp8", on_layer=bar.advance
            )
    finally:
        bar.close()
    scales = {
        module: float(nvfp4.weight_scale_2_from_amax(torch.tensor(amax, dtype=torch.float32), options.scale_math))
        for module, amax in calibration.input_amax.items()
    }
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
    return CalibrationRun(data, calibration, scales, kv_scales, settings)


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
