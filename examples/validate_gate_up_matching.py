#!/usr/bin/env python3
"""Gate/up (and every other fused group) weight_scale_2 matching, as the seed guide's script, for any paths.

    python examples/validate_gate_up_matching.py /path/to/model-nvfp4 [/path/to/other-model ...]

Exit code 0 when every checkpoint validates; same as `modelopt-streaming validate PATH`.
"""

import sys

from modelopt_streaming.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(max(main(["validate", path, "--skip_block_scales"]) for path in sys.argv[1:]))
