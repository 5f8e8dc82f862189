#!/usr/bin/env python3
"""Byte-level comparison of every quantized tensor of two checkpoints, as the seed guide's script.

    python examples/compare_weight_values.py NVIDIA_MODEL STREAMING_MODEL [--tensor '*experts.0.*'] [--source BF16]

Same as `modelopt-streaming compare-weights A B`; exit code 0 when every module is byte-identical.
"""

import sys

from modelopt_streaming.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(["compare-weights", *sys.argv[1:]]))
