#!/usr/bin/env python3
"""On a GPU, how torch divides a float32 tensor by a Python scalar, the form ModelOpt's export uses for every
scale (``amax / (6 * 448)`` for ``weight_scale_2`` and ``input_scale``, ``amax / 448`` for KV scales): this
checks, over many float32 values, that the CUDA result is the multiplication by the float32 reciprocal
(what ``--scale_math cuda`` writes) and says how often it differs from the true division (``--scale_math cpu``).

    python bench/gpu_scale_division.py
"""

from __future__ import annotations

import json

import torch


def main() -> None:
    assert torch.cuda.is_available(), "needs a GPU"
    g = torch.Generator(device="cuda").manual_seed(0)
    # amax values as calibration and weights give them: float32 spread over many binades.
    amax = torch.exp(torch.randn(4_000_000, device="cuda", generator=g) * 4).float()
    out = {"device": torch.cuda.get_device_name(), "values": amax.numel()}
    for divisor in (6 * 448.0, 448.0):
        on_gpu = amax / divisor
        reciprocal = amax * torch.tensor(1.0 / divisor, dtype=torch.float32, device="cuda")
        true_division = (amax.cpu() / divisor).cuda()
        out[f"/{divisor:g}"] = {
            "equals_reciprocal_multiply": bool(torch.equal(on_gpu, reciprocal)),
            "differs_from_true_division": float((on_gpu != true_division).float().mean()),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
