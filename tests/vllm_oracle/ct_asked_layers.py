"""Run under vLLM's interpreter: build a compressed-tensors checkpoint's model class as vLLM does and record,
for every layer vLLM asks its quantization config about, whether vLLM's compressed-tensors config quantizes it.

    python ct_asked_layers.py OUT_JSON CKPT...

The model is built on the meta device under vLLM's own config objects (EngineArgs.create_engine_config
reads config.json as ``vllm serve`` does; model_loader.utils.initialize_model builds the class, which hands
its packed_modules_mapping and hf_to_vllm_mapper to the quant config), as asked_layers.py here does for
ModelOpt checkpoints. vLLM's CompressedTensorsConfig decides; its get_quant_method is wrapped to record:

* Linear layers and lm_head: ``get_scheme_dict(layer, prefix)`` (``should_ignore_layer`` on ``ignore``, then the
  config groups' targets), None meaning unquantized; a ValueError ("Found different quantization schemes for
  the shards") is recorded as a refusal.
* Routed experts: what ``CompressedTensorsMoEMethod.get_moe_method`` asks, ``get_scheme_dict`` of expert 0's
  gate, up and down projections.

Every layer is then built unquantized (the CPU build has no NVFP4 kernels); nothing is loaded.
"""

import json
import os
import sys
import tempfile
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.distributed import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.distributed.parallel_state import destroy_model_parallel, model_parallel_is_initialized  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.layers.fused_moe import RoutedExperts  # noqa: E402
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead  # noqa: E402
from vllm.model_executor.model_loader.utils import initialize_model  # noqa: E402


def record_layers(path: str) -> dict:
    args = EngineArgs(model=path, skip_tokenizer_init=True, enforce_eager=True, max_model_len=128, load_format="dummy")
    vllm_config = args.create_engine_config()
    quant_config = vllm_config.quant_config
    asked: list[dict] = []

    class Recording(type(quant_config)):
        def get_quant_method(self, layer, prefix):
            entry = {"prefix": prefix, "layer": type(layer).__name__}
            try:
                if isinstance(layer, RoutedExperts):
                    self._add_fused_moe_to_target_scheme_map()
                    names = [
                        f"{prefix}.0.{p}"
                        for p in (layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name, layer.ckpt_down_proj_name)
                    ]
                    entry["asked"] = names
                    entry["quantized"] = [self.get_scheme_dict(layer, n) is not None for n in names]
                elif isinstance(layer, (LinearBase, ParallelLMHead)):
                    entry["quantized"] = self.get_scheme_dict(layer, prefix) is not None
                else:
                    return super().get_quant_method(layer, prefix)
            except ValueError as e:
                entry["error"] = str(e)
            asked.append(entry)
            return UnquantizedLinearMethod() if isinstance(layer, (LinearBase, ParallelLMHead)) else None

    quant_config.__class__ = Recording
    with set_current_vllm_config(vllm_config):
        if not model_parallel_is_initialized():
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"file://{tempfile.mktemp()}",
                backend="gloo",
            )
        else:
            destroy_model_parallel()
        initialize_model_parallel(1, 1)
        with torch.device("meta"):
            model = initialize_model(vllm_config)
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    return {
        "quantization": vllm_config.model_config.quantization,
        "layers": asked,
        "ignore": list(quant_config.ignore),
        "packed_modules_mapping": {k: list(v) for k, v in quant_config.packed_modules_mapping.items()},
        "has_mapper": mapper is not None,
    }


def main() -> None:
    out, paths = sys.argv[1], sys.argv[2:]
    results = {}
    for path in paths:
        try:
            results[path] = record_layers(path)
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            results[path] = {"error": traceback.format_exc()}
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
