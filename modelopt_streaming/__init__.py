"""modelopt-streaming: any-size safetensors checkpoint in, ModelOpt-exact NVFP4 checkpoint out.

The public surface: the jobs ``quantize``, ``convert``, ``decompress`` and ``evaluate``, the options ``quantize`` takes
(``QuantizeOptions``) and the summary it returns, and every error the tool raises (all subclasses of
``ModeloptStreamingError``). Messages go to the ``modelopt_streaming`` logger (configured by the command
line only)."""

from modelopt_streaming.errors import (
    CheckpointError,
    ConsumerError,
    ConversionRefused,
    IncompleteShardError,
    ModeloptStreamingError,
    OutputError,
    OutputStateError,
    PartlyExcludedFusedLayer,
    RankLostError,
    UsageError,
)
from modelopt_streaming.jobs.convert import convert
from modelopt_streaming.jobs.decompress import decompress
from modelopt_streaming.jobs.evaluate import EvaluationReport, evaluate
from modelopt_streaming.jobs.quantize import quantize
from modelopt_streaming.jobs.quantize_job import QuantizeOptions
from modelopt_streaming.jobs.summary import Summary
from modelopt_streaming.version import __version__

__all__ = [
    "CheckpointError",
    "ConsumerError",
    "ConversionRefused",
    "EvaluationReport",
    "IncompleteShardError",
    "ModeloptStreamingError",
    "OutputError",
    "OutputStateError",
    "PartlyExcludedFusedLayer",
    "QuantizeOptions",
    "RankLostError",
    "Summary",
    "UsageError",
    "__version__",
    "convert",
    "decompress",
    "evaluate",
    "quantize",
]
