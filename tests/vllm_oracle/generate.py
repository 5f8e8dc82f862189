"""Run under the vLLM (CPU build) interpreter: load an NVFP4 checkpoint in vLLM's own engine, greedy-decode
token-id prompts and write the tokens, their logprobs and how vLLM built every layer as JSON.

    python generate.py CKPT PROMPTS_JSON MAX_TOKENS N_LOGPROBS OUT_JSON

The CPU platform lists no NVFP4 linear kernel in vLLM 0.32
(vllm/model_executor/kernels/linear/__init__.py, ``_POSSIBLE_NVFP4_KERNELS`` has CUDA and ROCm only), so
``init_nvfp4_linear_kernel`` fails with "Failed to find a kernel that can implement the NVFP4 linear layer".
vLLM ships ``EmulationNvFp4LinearKernel`` (kernels/linear/nvfp4/emulation.py: dequantize the weight, NVFP4
quant-dequant of the activation, bf16 matmul); this script registers it for ``PlatformEnum.CPU`` through the
public ``register_linear_kernel`` only when the CPU list is empty, and reports whether it did.
"""

from __future__ import annotations

import json
import os
import sys

# The kernel registration below lives in this process; the engine must run here, not in a worker process.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# GiB of KV cache; the default reserves far more than a 128-token tiny model needs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def register_emulation_kernel() -> list[str]:
    """Register vLLM's emulation NVFP4 kernel for the CPU if the build lists none; return the CPU list as
    the build shipped it (kernel class names)."""
    from vllm.model_executor.kernels import linear as kernels
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum

    # The only way to read the shipped list is the module's registry itself; registration goes through the
    # public function.
    shipped = [k.__name__ for k in kernels._POSSIBLE_NVFP4_KERNELS.get(PlatformEnum.CPU, [])]
    if not shipped:
        kernels.register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, kernel_type="nvfp4")
    return shipped


def describe_layers(model) -> dict[str, dict]:
    """How vLLM built each layer that has a quantization method: the method, the kernel, the weight dtype."""
    layers = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        kernel = getattr(method, "kernel", None)
        weight = getattr(module, "weight", None)
        layers[name] = {
            "layer": type(module).__name__,
            "method": type(method).__name__,
            "kernel": type(kernel).__name__ if kernel is not None else None,
            "weight_dtype": str(weight.dtype) if weight is not None else None,
        }
    return layers


def apply_nvfp4_layers(model) -> dict[str, dict]:
    """Each NVFP4 layer's own ``quant_method.apply`` on a fixed bf16 input: what vLLM computes from the
    parameters it loaded from our files, apart from the rest of its CPU arithmetic (norms, rotary, attention),
    whose rounding differs between CPUs. The input is seeded by the layer's input width, so the test can
    make it again."""
    import torch

    out = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if type(method).__name__ != "ModelOptLinearMethod":
            continue
        width = module.input_size_per_partition
        x = (torch.randn(3, width, generator=torch.Generator().manual_seed(width)) * 2).to(torch.bfloat16)
        with torch.no_grad():
            y = method.apply(module, x)
        out[name] = {"x": x.float().tolist(), "y": y.float().tolist()}
    return out


def main() -> None:
    ckpt, prompts_path, max_tokens, n_logprobs, out_path = sys.argv[1:6]
    with open(prompts_path) as f:
        prompts = json.load(f)
    shipped = register_emulation_kernel()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=ckpt,
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=128,
        dtype="bfloat16",
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), logprobs=int(n_logprobs), ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        results.append(
            {
                "tokens": list(completion.token_ids),
                # One {token id: logprob} per generated position: the top n_logprobs and the sampled token.
                "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in completion.logprobs],
            }
        )
    layers = llm.apply_model(describe_layers)[0]
    applied = llm.apply_model(apply_nvfp4_layers)[0]
    with open(out_path, "w") as f:
        json.dump(
            {"cpu_nvfp4_kernels_shipped": shipped, "layers": layers, "results": results, "applied": applied}, f
        )


if __name__ == "__main__":
    main()
