"""Export: the files that describe the written tensors (configs, index, provenance), from what was written."""

from modelopt_streaming.sink.export.modelopt_format import (
    compact_exclusions,
    hf_quant_config,
    model_config,
    safetensors_index,
)
from modelopt_streaming.sink.export.side_files import copy_side_files

__all__ = ["compact_exclusions", "copy_side_files", "hf_quant_config", "model_config", "safetensors_index"]
