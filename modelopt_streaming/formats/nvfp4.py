"""Constants of the NVFP4 format (../shared/nvfp4-spec.md), shared by every stage; no code."""

BLOCK_SIZE = 16  # weights per E4M3 block scale, along the input dimension
E2M1_MAX = 6.0  # largest FP4 (E2M1) magnitude
E4M3_MAX = 448.0  # largest FP8 (E4M3) block scale
E4M3_MIN_SCALE = 2.0**-9  # smallest block scale ModelOpt clamps to: below it scales would underflow to zero
# E2M1 magnitudes indexed by the low three bits of a nibble; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
