"""Run under vLLM's interpreter: build each checkpoint's model class as vLLM does and record every layer
vLLM asks its quantization config about, with vLLM's own answer.

Input (argv[1]): a JSON file with a list of checkpoint directories. Output (argv[2]): a JSON file mapping
each directory to {"layers": [{"prefix", "layer", "method"}], "mapped_names", "exclude_modules",
"packed_modules_mapping"} or {"error": "..."}. With ``--serve``, the same requests and answers as JSON
lines on stdin and stdout (see client.py).

The model is built on the meta device (no weights are allocated or loaded) under vLLM's own config
objects: EngineArgs.create_engine_config reads config.json and the quantization config exactly as
``vllm serve`` does, and model_loader.utils.initialize_model builds the class, which passes its
packed_modules_mapping and hf_to_vllm_mapper to the quant config (SupportsQuant.__new__ or
configure_quant_config). The quant config is vLLM's ModelOptNvFp4Config with one change: its
get_quant_method records the prefix and the method vLLM's code chose, then hands the layer an
unquantized method so the model builds on a CPU (the CPU build has no NVFP4 kernels). The FusedMoE method
class is swapped for a marker, since constructing the NVFP4 MoE method selects a GPU backend.
"""

import contextlib
import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.distributed import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead  # noqa: E402
from vllm.model_executor.model_loader.utils import get_model_architecture, initialize_model  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

# Kimi-K2.5 moves its vision tower to current_platform.current_device() with .to(): on the meta device
# that must stay on the meta device (a harness detail; it changes no quantization decision).
current_platform.__class__.current_device = lambda *a, **k: torch.device("meta")


class MoEMethodMarker:
    """Stands in for ModelOptNvFp4FusedMoE: vLLM chose the NVFP4 MoE method for this layer."""

    def __init__(self, quant_config, moe_config):
        pass


def record_layers(path: str) -> dict:
    args = EngineArgs(model=path, skip_tokenizer_init=True, enforce_eager=True, max_model_len=128, load_format="dummy")
    vllm_config = args.create_engine_config()
    quant_config = vllm_config.quant_config
    asked: list[dict] = []

    class Recording(type(quant_config)):
        def get_quant_method(self, layer, prefix):
            entry = {"prefix": prefix, "layer": type(layer).__name__}
            try:
                method = super().get_quant_method(layer, prefix)
                entry["method"] = type(method).__name__
            except ValueError as e:  # is_layer_skipped: "Detected some but not all shards ..."
                entry["method"] = "refused"
                entry["error"] = str(e)
                method = None
            asked.append(entry)
            if isinstance(layer, (LinearBase, ParallelLMHead)):
                return UnquantizedLinearMethod()
            if entry["method"] == "MoEMethodMarker":
                return None
            return method

    quant_config.__class__ = Recording
    quant_config.FusedMoEMethodCls = MoEMethodMarker
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"file://{tempfile.mkdtemp()}/rendezvous",
            backend="gloo",
        )
        initialize_model_parallel(1, 1)  # the expert-parallel group exists only for a MoE config
        with torch.device("meta"):
            model = initialize_model(vllm_config)
    # Where each checkpoint tensor goes: the class's hf_to_vllm_mapper, as its load_weights applies it
    # (None: vLLM drops the tensor).
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    names = []
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as sf:
                names += list(sf.keys())  # noqa: SIM118 - safe_open is not iterable
    mapped = {n: (mapper.map_name(n) if mapper is not None else n) or "" for n in names}
    return {
        "mapped_names": mapped,
        "layers": asked,
        "exclude_modules": list(quant_config.exclude_modules),
        "packed_modules_mapping": {k: list(v) for k, v in quant_config.packed_modules_mapping.items()},
    }


def record_in_fresh_process(path: str) -> dict:
    """record_layers in a forked child, so that each checkpoint sees vLLM as a fresh ``vllm serve`` process
    does, with the imports already paid: model classes keep state between builds (Qwen3MoeForCausalLM.__init__
    adds gate_up_proj to its class-level packed_modules_mapping, which the next build would hand to the
    quant config), and the distributed groups are made for one model."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            result = record_layers(path)
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            result = {"error": traceback.format_exc()}
        with os.fdopen(write, "w") as f:
            json.dump(result, f)
        os._exit(0)  # no atexit handlers, no flushing of the parent's buffers
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": f"the oracle's child process died (wait status {status})"}


def answer(paths: list[str]) -> dict:
    results = {}
    for path in paths:
        started = time.monotonic()
        # Import the model class's module here once, not in every child (importing changes no state); a
        # failure is reported by the child with its traceback.
        with contextlib.suppress(Exception):
            get_model_architecture(EngineArgs(model=path, load_format="dummy").create_model_config())
        results[path] = record_in_fresh_process(path)
        results[path]["seconds"] = round(time.monotonic() - started, 2)
    return results


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        # One request per line on stdin (a JSON list of directories), one JSON answer per line on the
        # original stdout; everything vLLM prints goes to stderr. Import and start-up are paid once.
        protocol = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        for line in sys.stdin:
            protocol.write(json.dumps(answer(json.loads(line))) + "\n")
            protocol.flush()
        return
    with open(sys.argv[1]) as f:
        paths = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(answer(paths), f, indent=1)


if __name__ == "__main__":
    main()
