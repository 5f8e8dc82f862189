"""Codec: NVFP4 tensor math (``nvfp4``, the reference) and its fused kernels (``cpu_kernel``,
``cuda_kernel``), which give the same bytes; ``mse``, the per-block scale search of ``--algorithm mse``;
``select_codec`` picks the fastest one a device has for an algorithm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modelopt_streaming.codec import cpu_kernel, cuda_kernel, mse, nvfp4

# Weight quantization algorithms the codec implements (``quantize --algorithm``): ``rtn`` is ModelOpt's
# round-to-nearest block scales (its bytes), ``mse`` searches each block's scale (``codec/mse.py``).
ALGORITHMS = ("rtn", "mse")


@dataclass(frozen=True)
class Codec:
    tensor_amax: Callable[[torch.Tensor], torch.Tensor]
    quantize: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    name: str


def algorithm_settings(algorithm: str) -> dict:
    """What an algorithm's output bytes depend on besides the weights and the recipe (the provenance and the
    resume fingerprint record it)."""
    if algorithm == "rtn":
        return {}
    if algorithm == "mse":
        return {"scales_below": mse.DEFAULT_BELOW, "scales_above": mse.DEFAULT_ABOVE, "global_scale_search": False}
    raise ValueError(f"unknown algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")


def select_codec(device: torch.device, algorithm: str = "rtn") -> Codec:
    """For ``rtn``: the fused C kernel on the CPU when it was built, the Triton kernel on CUDA, else the
    reference torch codec. For ``mse``: the C kernel's search on the CPU, the Triton kernel's on CUDA (its compiled
    bytes equal the CPU's on an H100: bench/gpu_mse.py, docs/results/gpu_mse_h100_*.json), the torch search
    (``mse.quantize``) elsewhere."""
    if algorithm == "mse":
        if device.type == "cuda" and cuda_kernel.available():
            return Codec(nvfp4.tensor_amax, cuda_kernel.quantize_mse, "mse block-scale search, CUDA kernel (Triton)")
        if device.type == "cpu" and cpu_kernel.mse_available():
            return Codec(cpu_kernel.tensor_amax, cpu_kernel.quantize_mse, "mse block-scale search, fused CPU kernel")
        return Codec(nvfp4.tensor_amax, mse.quantize, f"mse block-scale search (torch) on {device.type}")
    if algorithm != "rtn":
        raise ValueError(f"unknown algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")
    if device.type == "cpu" and cpu_kernel.available():
        return Codec(cpu_kernel.tensor_amax, cpu_kernel.quantize, "fused CPU kernel")
    if device.type == "cuda" and cuda_kernel.available():
        return Codec(nvfp4.tensor_amax, cuda_kernel.quantize, "fused CUDA kernel (Triton)")
    return Codec(nvfp4.tensor_amax, nvfp4.quantize, f"torch reference codec on {device.type}")
