"""The CPU op ``jd_lora_layer`` (``kernels/torch_ops.jd_lora_torch``) against the base layer's GEMM.

The serving benchmark's layer: a bf16 q/k/v of hidden 512 (outputs 512, 256, 256), JD-Full rank
64, 8 clusters, 1,024 adapters; token mixes of a serving step: 64 decode tokens, 6 prefills of
24 + 58 decode tokens, and a 1,536-token prefill, each adapter uniformly random. For each mix:
the base q/k/v GEMM ``x @ Wᵀ`` (what every step pays anyway) and the added cost of the op per
layer call (metadata built once per step, amortised over ``--layers`` calls, as in the server),
best of ``--repeats`` runs of 50 calls, and their ratio. One JSON line per mix.

    python bench/jd_lora_layer.py [--threads 1] [--clusters 8] [--rank 64] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from cases import random_layer, token_rows  # noqa: E402

from vllm_jd.kernels.metadata import build_meta  # noqa: E402
from vllm_jd.kernels.torch_ops import JDLayerWeights, jd_lora_torch  # noqa: E402

MIXES = {"decode64": (64, [1] * 64), "mixed202": (64, [24] * 6 + [1] * 58), "prefill1536": (64, [24] * 64)}


def best_ms(fn, calls: int, repeats: int) -> float:
    """Best of ``repeats`` runs, each the mean over ``calls`` calls, in ms."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4, help="layer calls that share one step's metadata")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--diag", action="store_true", help="JD-Diag Σ")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d_in, d_out, dtype = 512, [512, 256, 256], torch.bfloat16
    V, U, sigma, cluster = random_layer(3, args.clusters, args.adapters, args.rank, d_in, d_out, args.diag, dtype, 0)
    w = JDLayerWeights.from_bases(V, U, sigma)
    W = (torch.randn(sum(d_out), d_in) / d_in**0.5).to(dtype)
    for mix, (seqs, lens) in MIXES.items():
        rows = token_rows("uniform", seqs, lens, args.adapters, 0.0, 1)
        x = torch.randn(len(rows), d_in).to(dtype)
        y = torch.zeros(len(rows), sum(d_out), dtype=dtype)
        base = best_ms(lambda: torch.nn.functional.linear(x, W), 50, args.repeats)

        def step():
            meta = build_meta(rows, cluster, args.adapters)
            for _ in range(args.layers):
                jd_lora_torch(x, y, w, meta)

        jd = best_ms(step, 50 // args.layers, args.repeats) / args.layers
        print(json.dumps({"bench": "jd_lora_layer", "mix": mix, "tokens": len(rows), "clusters": args.clusters,
                          "rank": args.rank, "sigma": "diag" if args.diag else "full", "threads": args.threads,
                          "base_gemm_ms": round(base, 3), "jd_added_ms": round(jd, 3),
                          "jd_vs_base_gemm": round(jd / base, 3),
                          "distinct_adapters": int(len(np.unique(rows)))}), flush=True)


if __name__ == "__main__":
    main()
