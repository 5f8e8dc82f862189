"""The two NVFP4 dialects side by side: tensor names, reciprocal global scales done exactly, and the
input scales of a reference checkpoint.

ModelOpt stores ``X.weight`` / ``X.weight_scale`` / ``X.weight_scale_2`` / ``X.input_scale`` (scalars that
multiply); compressed-tensors ``nvfp4-pack-quantized`` stores the same codes and block scales as
``X.weight_packed`` / ``X.weight_scale`` and the global scales as divisors, ``X.weight_global_scale =
1/weight_scale_2`` and ``X.input_global_scale = 1/input_scale``, float32 [1] (../shared/nvfp4-spec.md
section 5).

A float32 reciprocal does not always come back: ``1/(1/x) != x`` for about 15% of the ``weight_scale_2``
values a bf16 weight can give (and no float32 ``y`` has ``1/y == x`` for most of those), so a format
conversion cannot be undone from the tensors alone. Each conversion therefore keeps, in the provenance file
of what it writes, the value every reciprocal came from when the reciprocal alone would not give it back
(``exact_reciprocals``: tensor name -> [source bits, written bits], hexadecimal float32); quantize
``--format compressed-tensors`` keeps the same record for the ModelOpt values it inverted. Converting back
reads that record and restores the source value exactly, but only while the tensor still holds the bits it
was written with.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from modelopt_streaming.source.index import PROVENANCE_FILE, CheckpointError, TensorInfo

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
FORMATS = (MODELOPT, COMPRESSED_TENSORS)
# Leaf names of one quantized Linear in each dialect, by role.
LEAVES = {
    MODELOPT: {"weight": "weight", "weight_scale": "weight_scale", "global": "weight_scale_2", "input": "input_scale"},
    COMPRESSED_TENSORS: {
        "weight": "weight_packed",
        "weight_scale": "weight_scale",
        "global": "weight_global_scale",
        "input": "input_global_scale",
    },
}
# Shape of the scalar scales: ModelOpt exports 0-dim tensors, compressed-tensors [1]
# (compressed_tensors/quantization/lifecycle/initialize.py registers ``*_global_scale`` as shape (1,)).
SCALAR_SHAPE = {MODELOPT: (), COMPRESSED_TENSORS: (1,)}
RECORD_KEY = "exact_reciprocals"


def f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def f32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def f32(value: float) -> float:
    """``value`` rounded to float32 (round to nearest even, as torch rounds)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def f32_reciprocal(value: float) -> float:
    """``1/value`` in float32 arithmetic: the division of two float32 numbers, correctly rounded (a double
    division of float32 operands rounded once to float32 gives the same bits: double keeps 53 bits, more than
    the 2 * 24 + 2 that make double rounding harmless)."""
    return f32(1.0 / value)


class ExactReciprocals:
    """Reciprocal scalars for one conversion, exact in both directions.

    ``known`` is the record of the checkpoint being read (tensor name -> (source bits, written bits)).
    ``convert`` gives the value to write for a scalar read from ``name`` and remembers, under the name it
    is written as, whatever the reciprocal alone would lose."""

    def __init__(self, known: dict[str, tuple[int, int]] | None = None):
        self.known = dict(known or {})
        self.record: dict[str, tuple[int, int]] = {}

    def convert(self, name: str, value: float, out_name: str) -> float:
        bits = f32_bits(value)
        saved = self.known.get(name)
        # The value this reciprocal was made from, while the tensor still holds the bits written then.
        out = f32_from_bits(saved[0]) if saved is not None and saved[1] == bits else f32_reciprocal(value)
        if f32_bits(f32_reciprocal(out)) != bits:
            self.record[out_name] = (bits, f32_bits(out))
        return out

    def as_json(self) -> dict[str, list[str]]:
        return {k: [f"{a:08x}", f"{b:08x}"] for k, (a, b) in sorted(self.record.items())}


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
    from modelopt_streaming.source.index import build_index, resolve_checkpoint_dir
    from modelopt_streaming.source.reader import TensorReader

    root = resolve_checkpoint_dir(path)
    index = build_index(root)
    fmt = detect_format(index.config, index.tensors, root)
    if fmt is None:
        raise CheckpointError(f"{root}: not an NVFP4 checkpoint (ModelOpt or compressed-tensors nvfp4-pack-quantized)")
    leaf = LEAVES[fmt]["input"]
    wanted = {n[: -len(leaf) - 1]: info for n, info in index.tensors.items() if n.endswith("." + leaf)}
    # ModelOpt 0.47's 3-D fused experts: ``X_input_scale`` for the tensor X.
    if fmt == MODELOPT:
        wanted.update({n[: -len("_input_scale")]: i for n, i in index.tensors.items() if n.endswith("_input_scale")})
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
