import os
import sys
from pathlib import Path

import pytest

# The CUDA codec's Triton kernel is also checked on machines without a GPU, through Triton's interpreter;
# the variable must be set before Triton is first imported (the runner imports the kernel module).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
# vLLM (CPU build) needs a newer transformers than the ModelOpt oracle, so it lives in its own virtual
# environment, created by `make test` (Makefile target .venv-vllm); tests run consumer scripts in it.
VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The interpreter of the vLLM virtual environment; its absence is a setup error, never a skip."""
    if not VLLM_PYTHON.exists():
        raise RuntimeError(f"vLLM's virtual environment is missing ({VLLM_PYTHON}): run `make test`, which creates it")
    return VLLM_PYTHON
