#!/usr/bin/env python3
"""Scale distributions of one checkpoint, or two side by side, as the seed guide's script, for any paths.

    python examples/compare_scales.py MODEL_A [MODEL_B] [--plot scales.png]

Same as `modelopt-streaming compare-scales MODEL_A [MODEL_B] [--plot FILE]`.
"""

import sys

from modelopt_streaming.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(["compare-scales", *sys.argv[1:]]))
