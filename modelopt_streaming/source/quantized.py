"""Reading checkpoints that are already NVFP4, in either dialect: which dialect the files are, which modules
are quantized and with which tensors, the scalars they hold (a reference's input scales), and the exact
reciprocals our provenance file records (``formats.interchange.ExactReciprocals``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from modelopt_streaming.errors import CheckpointError
from modelopt_streaming.formats.interchange import (
    COMPRESSED_TENSORS,
    EXPERTS_3D_SUFFIXES,
    LEAVES,
    MODELOPT,
    PROVENANCE_FILE,
    RECORD_KEY,
    ExactReciprocals,
)
from modelopt_streaming.source.hub_cache import resolve_checkpoint_dir
from modelopt_streaming.source.index import TensorInfo, build_index
from modelopt_streaming.source.reader import TensorReader


def load_exact_reciprocals(checkpoint_dir: str | Path) -> dict[str, tuple[int, int]]:
    """The ``exact_reciprocals`` record of a checkpoint's provenance file, or nothing."""
    path = Path(checkpoint_dir) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {k: (int(a, 16), int(b, 16)) for k, (a, b) in (data.get(RECORD_KEY) or {}).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable {RECORD_KEY} record ({e})") from None


def detect_format(config: dict, tensors: dict[str, TensorInfo], root: Path) -> str | None:
    """ModelOpt or compressed-tensors NVFP4 (from the files, as validate reads them), or None."""
    if (root / "hf_quant_config.json").is_file():
        return MODELOPT
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    method = qc.get("quant_method")
    if method == MODELOPT:
        return MODELOPT
    if method == COMPRESSED_TENSORS and qc.get("format") == "nvfp4-pack-quantized":
        return COMPRESSED_TENSORS
    if any(n.endswith(".weight_packed") and t.dtype == "U8" for n, t in tensors.items()):
        return COMPRESSED_TENSORS
    return None


def nvfp4_modules(tensors: dict[str, TensorInfo], fmt: str) -> dict[str, dict[str, TensorInfo]]:
    """Quantized 2-D modules of one dialect: module -> {role: tensor} (roles weight, weight_scale, global,
    input; input absent for weight-only checkpoints)."""
    leaves = LEAVES[fmt]
    out: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == leaves["weight"] and info.dtype == "U8" and len(info.shape) == 2:
            out[module] = {"weight": info}
    for module, roles in out.items():
        for role in ("weight_scale", "global", "input"):
            info = tensors.get(f"{module}.{leaves[role]}")
            if info is not None:
                roles[role] = info
    return out


def reference_input_scales(path: str | Path) -> dict[str, float]:
    """``input_scale`` of every quantized module of a reference NVFP4 checkpoint (either dialect), by module
    name, as ModelOpt stores it (a compressed-tensors ``input_global_scale`` is turned back exactly, see
    ``ExactReciprocals``). Reads headers and scalars only."""
    root = resolve_checkpoint_dir(path)
    index = build_index(root)
    fmt = detect_format(index.config, index.tensors, root)
    if fmt is None:
        raise CheckpointError(f"{root}: not an NVFP4 checkpoint (ModelOpt or compressed-tensors nvfp4-pack-quantized)")
    leaf = LEAVES[fmt]["input"]
    wanted = {n[: -len(leaf) - 1]: info for n, info in index.tensors.items() if n.endswith("." + leaf)}
    # ModelOpt 0.47's 3-D fused experts: ``X_input_scale`` for the tensor X.
    if fmt == MODELOPT:
        suffix = EXPERTS_3D_SUFFIXES["input"]
        wanted.update({n[: -len(suffix)]: i for n, i in index.tensors.items() if n.endswith(suffix)})
    reciprocals = ExactReciprocals(load_exact_reciprocals(root)) if fmt == COMPRESSED_TENSORS else None
    out: dict[str, float] = {}
    with TensorReader(root) as reader:
        for module, info in sorted(wanted.items()):
            value = read_positive_scalar(reader, info)
            out[module] = reciprocals.convert(info.name, value, "") if reciprocals else value
    return out


def read_positive_scalar(reader, info: TensorInfo) -> float:
    """A global or input scale's value: a float32 scalar, finite and > 0 (both dialects invert or divide by
    it), else a one-line error naming the file and tensor. ``reader``: a ``reader.TensorReader``."""
    where = f"{reader.root / info.file}, tensor {info.name!r}"
    if info.dtype != "F32" or info.numel != 1:
        raise CheckpointError(f"{where}: {info.dtype} {list(info.shape)}, expected a float32 scalar")
    value = float(reader.read(info).reshape(()))
    if not (math.isfinite(value) and value > 0):
        raise CheckpointError(f"{where}: {value} cannot be inverted (must be finite and > 0)")
    return value
