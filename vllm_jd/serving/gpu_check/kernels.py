"""Kernel checks on the CUDA device: (a) parity with the float32 twin, (b) CUDA-graph capture
then replay under four adapter mappings, equal to eager, (c) time per layer call against the
q/k/v GEMM at decode 64 / 256 and a 2,048-token prefill. Each yields JSON-ready dicts.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_jd.kernels.gpu import selfcheck
from vllm_jd.kernels.gpu.buffers import TileBuffers
from vllm_jd.kernels.gpu.decode_model import step_rows
from vllm_jd.kernels.gpu.tiles import build_tiles

QKV = (4096, [4096, 1024, 1024])
O_PROJ = (4096, [4096])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def parity(device: str = "cuda"):
    """(a) ``selfcheck.check_layer`` over Mistral's q/k/v and o shapes, dtypes, ranks, clusters, Σ kinds."""
    cases = [(shape, dt, R, C, False) for shape in (QKV, O_PROJ) for dt in DTYPES for R, C in ((16, 8), (64, 1))]
    cases += [(QKV, torch.bfloat16, 16, 25, True), (QKV, torch.bfloat16, 512, 2, False)]
    for (d_in, widths), dtype, R, C, diag in cases:
        why = selfcheck.check_layer(d_in, widths, R, C, dtype, diag, device=device)
        yield {"check": "kernel_parity", "d_in": d_in, "widths": widths, "rank": R, "clusters": C,
               "dtype": str(dtype).removeprefix("torch."), "diag": diag, "ok": why is None, "detail": why}


def random_weights(R: int = 16, C: int = 8, N: int = 1024, dtype=torch.bfloat16, device: str = "cuda"):
    """A random q/k/v layer of Mistral's shapes on ``device`` (``selfcheck.random_weights``), its
    expand layout made before any capture."""
    d_in, widths = QKV
    w = selfcheck.random_weights(d_in, widths, R, C, N, False, dtype, device, torch.Generator().manual_seed(0))[3]
    w.expand_bases()
    return w


def graph_replay(device: str = "cuda", T: int = 64):
    """(b) Capture one call for a T-row batch, then replay it under four mappings (distinct, one
    adapter, half without adapter, none at all): each must equal an eager call exactly."""
    from vllm_jd.kernels.gpu.jd_triton import jd_lora_gpu

    N, C = 1024, 8
    w = random_weights(device=device)
    cluster_of_row = np.append(np.arange(N) * C // N, 0)
    tiles = TileBuffers(T, T, device)
    x, y0, y = (torch.randn(T, n, device=device, dtype=torch.bfloat16) for n in (4096, 6144, 6144))
    rng = np.random.default_rng(1)
    mappings = {"distinct": rng.choice(N, T, replace=False), "one adapter": np.full(T, 7),
                "half none": np.where(np.arange(T) % 2 == 0, rng.integers(0, N, T), N), "none": np.full(T, N)}
    tiles.write(build_tiles(mappings["distinct"], cluster_of_row, N))
    for _ in range(2):  # compile and warm up outside the capture
        y.copy_(y0)
        jd_lora_gpu(x, y, w, tiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(y0)
        jd_lora_gpu(x, y, w, tiles)
    for name, rows in mappings.items():
        tiles.write(build_tiles(rows, cluster_of_row, N))
        x.copy_(torch.randn_like(x))
        graph.replay()
        eager = y0.clone()
        jd_lora_gpu(x, eager, w, tiles)
        torch.cuda.synchronize()
        yield {"check": "cuda_graph_replay", "mapping": name, "rows": T, "ok": bool(torch.equal(y, eager)),
               "max_diff": float((y.float() - eager.float()).abs().max())}


def _graph_time_us(fn, reps: int = 50) -> float:
    """Mean µs of ``fn`` captured in a CUDA graph of ``reps`` calls (launch overhead excluded, as
    vLLM serves decode from graphs)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def timing(device: str = "cuda"):
    """(c) µs per layer call of the op and of the q/k/v GEMM (bf16, rank 16, 8 clusters, 1,024 adapters)."""
    from vllm_jd.kernels.gpu.jd_triton import jd_lora_gpu

    w = random_weights(device=device)
    W = torch.randn(6144, 4096, device=device, dtype=torch.bfloat16) / 64
    for label, T, rows in (("decode", 64, None), ("decode", 256, None), ("prefill", 2048, "prefill")):
        if rows is None:
            rows, cluster_of_row = step_rows(T, 1024, 8)
        else:
            rows, cluster_of_row = np.repeat(np.arange(4) * 97, 512), np.append(np.arange(1024) * 8 // 1024, 0)
        tiles = TileBuffers(T, T, device)
        tiles.write(build_tiles(rows, cluster_of_row, 1024))
        x = torch.randn(T, 4096, device=device, dtype=torch.bfloat16)
        y = torch.zeros(T, 6144, device=device, dtype=torch.bfloat16)
        op_us = _graph_time_us(lambda: jd_lora_gpu(x, y, w, tiles))  # noqa: B023
        gemm_us = _graph_time_us(lambda: torch.mm(x, W.t(), out=y))  # noqa: B023
        yield {"check": "op_time", "step": label, "tokens": T, "op_us": round(op_us, 2), "qkv_gemm_us": round(gemm_us, 2),
               "op_over_gemm": round(op_us / gemm_us, 3), "ok": True}
