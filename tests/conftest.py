import os
import sys
from pathlib import Path

# The CUDA codec's Triton kernel is also checked on machines without a GPU, through Triton's interpreter;
# the variable must be set before Triton is first imported (the runner imports the kernel module).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))
