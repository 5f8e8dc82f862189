"""modelopt-streaming: any-size safetensors checkpoint in, ModelOpt-exact NVFP4 checkpoint out."""

__version__ = "0.1.0"

from .convert import convert  # noqa: E402
from .decompress import decompress  # noqa: E402
from .errors import UsageError  # noqa: E402
from .runner import quantize  # noqa: E402
from .summary import Summary  # noqa: E402

__all__ = ["Summary", "UsageError", "__version__", "convert", "decompress", "quantize"]
