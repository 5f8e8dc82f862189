"""The NVFP4 format (../shared/nvfp4-spec.md): its constants and the E2M1 code table, shared by every stage.

Like torchao's ``mx_formats``: format constants and pure functions of tensors, no files and no names. The
codec's quantization lives in ``codec``; what is here is what more than one stage needs to agree on.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK_SIZE", "E2M1_MAX", "E2M1_VALUES", "E4M3_MAX", "E4M3_MIN_SCALE", "unpack_e2m1"]

BLOCK_SIZE = 16  # weights per E4M3 block scale, along the input dimension
E2M1_MAX = 6.0  # largest FP4 (E2M1) magnitude
E4M3_MAX = 448.0  # largest FP8 (E4M3) block scale
E4M3_MIN_SCALE = 2.0**-9  # smallest block scale ModelOpt clamps to: below it scales would underflow to zero
# E2M1 magnitudes indexed by the low three bits of a nibble; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """The float32 values of E2M1 codes packed two to a byte along the last dimension.

    Byte j holds element 2j in its low nibble and element 2j+1 in its high nibble (spec section 1.6, and
    OCP MXFP4 as GPT-OSS stores it). Every E2M1 value is exact in float32.

    Args:
        packed: uint8 tensor [..., n], on any device.

    Returns:
        float32 tensor [..., 2n] on the same device.
    """
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=packed.device)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return table[codes.long()]
