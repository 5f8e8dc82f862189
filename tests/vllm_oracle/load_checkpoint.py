"""Run under the vLLM (CPU build) interpreter: load one NVFP4 checkpoint in vLLM's engine (either dialect),
greedy-decode token-id prompts and write the tokens and how vLLM built every quantized layer as JSON.

    python load_checkpoint.py CKPT PROMPTS_JSON MAX_TOKENS OUT_JSON

The CPU build ships no NVFP4 linear kernel; both vLLM's ModelOpt path and its compressed-tensors path
(``compressed_tensors/schemes/compressed_tensors_w4a4_nvfp4.py``, ``init_nvfp4_linear_kernel``) pick one from
the same registry, so vLLM's own ``EmulationNvFp4LinearKernel`` is registered for ``PlatformEnum.CPU``
through the public ``register_linear_kernel`` when the CPU list is empty (the approach of generate.py here).
"""

from __future__ import annotations

import json
import os
import sys

# The kernel registration lives in this process; the engine must run here, not in a worker process.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    ckpt, prompts_path, max_tokens, out_path = sys.argv[1:5]
    with open(prompts_path) as f:
        prompts = json.load(f)

    from vllm.model_executor.kernels import linear as kernels
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum

    if not kernels._POSSIBLE_NVFP4_KERNELS.get(PlatformEnum.CPU):
        kernels.register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, kernel_type="nvfp4")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=ckpt, enforce_eager=True, skip_tokenizer_init=True, max_model_len=128, dtype="bfloat16", seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def describe(model) -> dict:
        layers = {}
        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                scheme = getattr(module, "scheme", None)
                layers[name] = {
                    "method": type(method).__name__,
                    "scheme": type(scheme).__name__ if scheme is not None else None,
                }
        return layers

    result = {
        "quantization": llm.llm_engine.model_config.quantization,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "layers": llm.apply_model(describe)[0],
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
