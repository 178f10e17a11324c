"""Start-up parity check: the GPU kernels against the float32 twin, on the real device, at the
served layers' shapes and dtype. GPU code ships before it has run on every GPU; a server whose
kernels disagree with the twin must refuse to serve rather than serve wrong numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_jd.kernels.gpu.buffers import TileBuffers
from vllm_jd.kernels.gpu.tiles import build_tiles
from vllm_jd.kernels.reference import jd_lora_ref
from vllm_jd.kernels.weights import JDLayerWeights

TOLERANCE = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (5e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
"""(atol, rtol): |kernel − twin| ≤ atol + rtol·|twin| everywhere; rtol covers the output's own
rounding (a bf16 ulp is 2⁻⁷ of the value)."""


def random_weights(d_in: int, widths: list[int], R: int, C: int, N: int, diag: bool, dtype, device, gen):
    """Random bases and Σ of one layer (row N the zero "no adapter" row): (V, U, Σ) on the host for
    the twin, and the ``JDLayerWeights`` on ``device`` for the kernels."""
    V = torch.randn(len(widths), C, d_in, R, generator=gen) / d_in**0.5
    U = [torch.randn(C, d, R, generator=gen) / R**0.5 for d in widths]
    sigma = torch.randn((len(widths), N + 1, R) if diag else (len(widths), N + 1, R, R), generator=gen)
    sigma = sigma / (1 if diag else R**0.5)
    sigma[:, N] = 0
    w = JDLayerWeights.from_bases(V.to(dtype).to(device), [u.to(dtype).to(device) for u in U], sigma.to(device))
    return V.to(dtype), [u.to(dtype) for u in U], sigma, w


def step_rows(N: int, C: int, gen: np.random.Generator) -> np.ndarray:
    """A mixed step: 40 decode tokens of distinct adapters, a 70-token prefill, tokens without an
    adapter, and one adapter per cluster at least."""
    decode = gen.choice(N, size=min(N, 40), replace=False)
    prefill = np.full(70, gen.integers(N))
    return np.concatenate([decode, [N] * 5, prefill, np.arange(min(N, C)), [N] * 3])


def check_layer(d_in: int, widths: list[int], rank: int, clusters: int, dtype: torch.dtype, diag: bool = False,
                device: torch.device | str = "cuda", seed: int = 0) -> str | None:
    """Run ``jd_lora_gpu`` on random weights of this shape against ``jd_lora_ref``; None when they
    agree, else one line saying where and by how much. x gets 8 padded rows beyond the mapped tokens."""
    from vllm_jd.kernels.gpu.jd_triton import jd_lora_gpu  # triton only where a check runs

    gen = torch.Generator().manual_seed(seed)
    N = max(2 * clusters, 48)
    V, U, sigma, w = random_weights(d_in, widths, rank, clusters, N, diag, dtype, device, gen)
    cluster_of_row = np.append(np.arange(N) % clusters, 0)
    rows = step_rows(N, clusters, np.random.default_rng(seed))
    padded = np.concatenate([rows, [N] * 8])
    tiles = TileBuffers(len(padded), len(rows), device)
    tiles.write(build_tiles(rows, cluster_of_row, N))
    x = torch.randn(len(padded), d_in, generator=gen).to(dtype)
    y = torch.randn(len(padded), sum(widths), generator=gen).to(dtype)
    want = jd_lora_ref(x, y, V, U, sigma, torch.from_numpy(cluster_of_row[padded]), torch.from_numpy(padded))
    got = y.to(device)
    jd_lora_gpu(x.to(device), got, w, tiles)
    got = got.cpu()
    atol, rtol = TOLERANCE[dtype]
    err = ((got.float() - want.float()).abs() / (atol + rtol * want.float().abs())).max().item()
    untouched = torch.equal(got[torch.from_numpy(padded == N)], y[torch.from_numpy(padded == N)])
    where = f"d_in {d_in}, slices {widths}, rank {rank}, {clusters} clusters, {str(dtype).split('.')[-1]}"
    if not np.isfinite(err) or err > 1:
        return f"GPU kernels differ from the float32 twin by {err:.3g}× the tolerance (atol {atol}, rtol {rtol}) at {where}"
    if not untouched:
        return f"GPU kernels changed the output of tokens without an adapter at {where}"
    return None


def check_served(layers: list[JDLayerWeights]) -> str | None:
    """``check_layer`` once per distinct shape among the served layers (on their device); the
    first failure's line, or None."""
    seen = set()
    for w in layers:
        key = (w.V_all.shape[0], tuple(u.shape[1] for u in w.UT), w.rank, w.num_clusters, w.V_all.dtype,
               w.sigma.dim() == 3)
        if key in seen:
            continue
        seen.add(key)
        d_in, widths, R, C, dtype, diag = key
        if (why := check_layer(d_in, list(widths), R, C, dtype, diag, device=w.V_all.device)) is not None:
            return why
    return None
