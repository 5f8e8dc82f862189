"""modelopt-streaming: any-size safetensors checkpoint in, ModelOpt-exact NVFP4 checkpoint out."""

__version__ = "0.1.0"

from modelopt_streaming.errors import UsageError  # noqa: E402
from modelopt_streaming.jobs.convert import convert  # noqa: E402
from modelopt_streaming.jobs.decompress import decompress  # noqa: E402
from modelopt_streaming.jobs.quantize import quantize  # noqa: E402
from modelopt_streaming.jobs.summary import Summary  # noqa: E402

__all__ = ["Summary", "UsageError", "__version__", "convert", "decompress", "quantize"]
