"""Codec: NVFP4 tensor math (``nvfp4``, the reference) and its fused kernels (``cpu_kernel``,
``cuda_kernel``), which give the same bytes; ``select_codec`` picks the fastest one a device has."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modelopt_streaming.codec import cpu_kernel, cuda_kernel, nvfp4


@dataclass(frozen=True)
class Codec:
    tensor_amax: Callable[[torch.Tensor], torch.Tensor]
    quantize: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    name: str


def select_codec(device: torch.device) -> Codec:
    """The fused C kernel on the CPU when it was built, else the reference torch codec (CPU or CUDA)."""
    if device.type == "cpu" and cpu_kernel.available():
        return Codec(cpu_kernel.tensor_amax, cpu_kernel.quantize, "fused CPU kernel")
    if device.type == "cuda" and cuda_kernel.available():
        return Codec(nvfp4.tensor_amax, cuda_kernel.quantize, "fused CUDA kernel (Triton)")
    return Codec(nvfp4.tensor_amax, nvfp4.quantize, f"torch reference codec on {device.type}")
