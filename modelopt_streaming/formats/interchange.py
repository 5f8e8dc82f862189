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

import struct

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
# ModelOpt 0.47's 3-D fused experts (GPT-OSS, Llama-4): the packed codes keep the tensor's name X and the scales
# are named by suffix, X_weight_scale, X_weight_scale_2 and X_input_scale (one each for the whole tensor), by role.
EXPERTS_3D_SUFFIXES = {"weight_scale": "_weight_scale", "global": "_weight_scale_2", "input": "_input_scale"}
# Shape of the scalar scales: ModelOpt exports 0-dim tensors, compressed-tensors [1]
# (compressed_tensors/quantization/lifecycle/initialize.py registers ``*_global_scale`` as shape (1,)).
SCALAR_SHAPE = {MODELOPT: (), COMPRESSED_TENSORS: (1,)}
# Our record of how an output was made (its provenance file); read back when one of our outputs is the input of
# another job. RECORD_KEY is the entry of that file that keeps the exact reciprocals.
PROVENANCE_FILE = "modelopt_streaming.json"
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
