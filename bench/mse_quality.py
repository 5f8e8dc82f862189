#!/usr/bin/env python3
"""How much ``--algorithm mse`` lowers the weight reconstruction error against ``rtn``, on random weights, and
which candidate scales earn their cost (docs/quality.md quotes the table).

For each distribution (Student-t with 3 and 5 degrees of freedom, Gaussian) and global scale (the tensor's
own, and fused-group members whose partner holds a 3x or 50x larger value), it prints the squared error summed
over the tensor relative to rtn's, for several candidate sets, and the share of blocks whose scale moved.

    PYTHONPATH=. python bench/mse_quality.py [--rows 1024 --cols 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from modelopt_streaming.codec import mse, nvfp4  # noqa: E402

CANDIDATE_SETS = [(2, 1), (2, 2), (3, 4), (2, 6), (8, 12)]


def weights(kind: str, shape, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(shape, generator=g)
    if kind == "gauss":
        return z * 0.02
    df = int(kind[1:])
    v = torch.stack([torch.randn(shape, generator=g) ** 2 for _ in range(df)]).sum(0) / df
    return z / v.sqrt() * 0.02


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    head = " | ".join(f"-{b}..+{a}" for b, a in CANDIDATE_SETS)
    print(f"| weights (bf16 {args.rows}x{args.cols}) | global scale | {head} | blocks moved (default) |")
    print("|---|---|" + "---|" * len(CANDIDATE_SETS) + "---|")
    for kind in ("t3", "t5", "gauss"):
        w = weights(kind, (args.rows, args.cols), g).to(torch.bfloat16)
        own = nvfp4.weight_scale_2_from_amax(nvfp4.tensor_amax(w))
        for mult in (1, 3, 50):
            ws2 = own * mult
            _, rtn_scales, rtn_err = mse.quantize_with_error(w, ws2, 0, 0)
            base = rtn_err.double().sum()
            cells, moved = [], 0.0
            for below, above in CANDIDATE_SETS:
                _, scales, err = mse.quantize_with_error(w, ws2, below, above)
                assert (err <= rtn_err).all()
                cells.append(f"{float(err.double().sum() / base):.3f}")
                if (below, above) == (mse.DEFAULT_BELOW, mse.DEFAULT_ABOVE):
                    moved = float((scales.view(torch.uint8) != rtn_scales.view(torch.uint8)).float().mean())
            where = "own amax" if mult == 1 else f"fused, group amax {mult}x"
            print(f"| {kind} | {where} | " + " | ".join(cells) + f" | {moved:.0%} |")


if __name__ == "__main__":
    main()
