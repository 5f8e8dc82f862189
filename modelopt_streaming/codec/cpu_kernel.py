"""The fused CPU codec: the C kernel in ``_nvfp4_cpu.c``, called through ctypes on row ranges from a
thread pool (ctypes releases the GIL, so the threads run in parallel). Same bytes as ``nvfp4.quantize``;
``available()`` is False when the package was installed without a C compiler."""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch

from modelopt_streaming.codec import mse

_SOURCE_TYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
# Rows per task: enough work to amortise a call, small enough to balance threads.
_MIN_ELEMS_PER_TASK = 1 << 20


@cache
def _lib():
    if os.environ.get("MODELOPT_STREAMING_CODEC") == "reference":
        return None
    spec = importlib.util.find_spec("modelopt_streaming.codec._nvfp4_cpu")
    if spec is None or not spec.origin:
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.nvfp4_quantize_rows.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.nvfp4_quantize_rows.restype = None
    lib.nvfp4_amax.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    lib.nvfp4_amax.restype = ctypes.c_float
    lib.nvfp4_e4m3_table.argtypes = [ctypes.c_void_p]
    lib.nvfp4_e4m3_table.restype = None
    if hasattr(lib, "nvfp4_mse_rows"):  # absent from a library built before --algorithm mse
        lib.nvfp4_mse_rows.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_float,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.nvfp4_mse_rows.restype = None
    return lib


def available() -> bool:
    return _lib() is not None


def mse_available() -> bool:
    """The library has the mse search (``quantize_mse``)."""
    return available() and hasattr(_lib(), "nvfp4_mse_rows")


def threads() -> int:
    """Codec threads: MODELOPT_STREAMING_THREADS, else this process's share of the CPUs (torchrun starts
    LOCAL_WORLD_SIZE processes on one host)."""
    explicit = int(os.environ.get("MODELOPT_STREAMING_THREADS", 0))
    share = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return explicit or max(1, share)


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="nvfp4")


def supports(weight: torch.Tensor) -> bool:
    return available() and weight.device.type == "cpu" and weight.dtype in _SOURCE_TYPES


def _spans(total: int, unit: int) -> list[tuple[int, int]]:
    n = max(1, min(threads() * 4, total * unit // _MIN_ELEMS_PER_TASK))
    step = -(-total // n)
    return [(s, min(total, s + step)) for s in range(0, total, step)]


def tensor_amax(weight: torch.Tensor) -> torch.Tensor:
    """max|W| as a float32 0-dim tensor; NaN if W holds NaN (as the reference)."""
    w = weight.contiguous().reshape(-1)
    kind, size = _SOURCE_TYPES[w.dtype], w.element_size()
    lib = _lib()
    parts = list(
        _pool().map(lambda s: lib.nvfp4_amax(w.data_ptr() + s[0] * size, kind, s[1] - s[0]), _spans(w.numel(), 1))
    )
    values = torch.tensor(parts or [0.0], dtype=torch.float32)
    return values.max()  # NaN propagates


def e4m3_table() -> torch.Tensor:
    """The kernel's compile-time table of float8_e4m3fn values by bit pattern (128 float32)."""
    out = torch.empty(128, dtype=torch.float32)
    _lib().nvfp4_e4m3_table(out.data_ptr())
    return out


def _rows_in_parallel(
    weight: torch.Tensor, weight_scale_2: torch.Tensor, kernel: str, options: tuple[int, ...] = (), work: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernel(source, kind, rows, cols, ws2, *options, packed, scales)`` of the C library over spans of rows on
    the thread pool; ``work``: the kernel's cost per element against rtn's, so that slower kernels get smaller
    spans and every thread stays busy."""
    if weight.dim() != 2 or weight.shape[1] % 16:
        raise ValueError(f"NVFP4 quantizes 2-D weights with input dim % 16 == 0, got {tuple(weight.shape)}")
    w = weight.contiguous()
    rows, cols = w.shape
    packed = torch.empty((rows, cols // 2), dtype=torch.uint8)
    scales = torch.empty((rows, cols // 16), dtype=torch.uint8)
    kind, size, ws2 = _SOURCE_TYPES[w.dtype], w.element_size(), float(weight_scale_2)
    fn = getattr(_lib(), kernel)

    def run(span: tuple[int, int]) -> None:
        r0, r1 = span
        fn(
            w.data_ptr() + r0 * cols * size,
            kind,
            r1 - r0,
            cols,
            ws2,
            *options,
            packed.data_ptr() + r0 * (cols // 2),
            scales.data_ptr() + r0 * (cols // 16),
        )

    list(_pool().map(run, _spans(rows, cols * work)))
    return packed, scales.view(torch.float8_e4m3fn)


def quantize(weight: torch.Tensor, weight_scale_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and bytes as ``nvfp4.quantize``."""
    return _rows_in_parallel(weight, weight_scale_2, "nvfp4_quantize_rows")


def quantize_mse(
    weight: torch.Tensor, weight_scale_2: torch.Tensor, below: int = mse.DEFAULT_BELOW, above: int = mse.DEFAULT_ABOVE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and bytes as ``mse.quantize``, in one pass per block on the thread pool."""
    mse.candidate_offsets(below, above)  # the same ValueError as the reference for a negative count
    # The search does about ten times rtn's work per element.
    return _rows_in_parallel(weight, weight_scale_2, "nvfp4_mse_rows", (below, above), work=10)
