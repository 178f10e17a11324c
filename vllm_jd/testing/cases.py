"""Shared shapes and popularity cases for op tests and benchmarks (punica's grid, scaled down)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

POPULARITY = ("distinct", "uniform", "zipf", "identical")
TOL = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def token_rows(popularity: str, num_seqs: int, seq_lens: list[int], num_adapters: int, none_frac: float,
               seed: int) -> np.ndarray:
    """Σ row of every token: each sequence picks an adapter by ``popularity``; a ``none_frac``
    share of sequences has no adapter (row ``num_adapters``)."""
    rng = np.random.default_rng(seed)
    if popularity == "distinct":
        seq_adapter = rng.permutation(max(num_adapters, num_seqs))[:num_seqs] % num_adapters
    elif popularity == "uniform":
        seq_adapter = rng.integers(0, num_adapters, num_seqs)
    elif popularity == "zipf":  # S-LoRA's definition: P(i) ∝ 1 / (i+1)^α, α = 1
        p = 1.0 / np.arange(1, num_adapters + 1)
        seq_adapter = rng.choice(num_adapters, num_seqs, p=p / p.sum())
    elif popularity == "identical":
        seq_adapter = np.zeros(num_seqs, dtype=np.int64)
    else:
        raise ValueError(f"unknown popularity {popularity!r}")
    seq_adapter = np.where(rng.random(num_seqs) < none_frac, num_adapters, seq_adapter)
    return np.repeat(seq_adapter, seq_lens)


def random_layer(S: int, C: int, N: int, R: int, d_in: int, d_out: list[int], diag: bool, dtype, seed: int):
    """Random V [S, C, d_in, R], U list of [C, d_s, R], Σ [S, N+1, R(, R)] with a zero row N,
    and cluster_of_row [N+1]."""
    g = torch.Generator().manual_seed(seed)
    V = (torch.randn(S, C, d_in, R, generator=g) / d_in**0.5).to(dtype)
    U = [(torch.randn(C, d, R, generator=g) / R**0.5).to(dtype) for d in d_out]
    sigma = torch.randn((S, N + 1, R) if diag else (S, N + 1, R, R), generator=g) / (1 if diag else R**0.5)
    sigma[:, N] = 0
    cluster = np.random.default_rng(seed).integers(0, C, N + 1)
    cluster[N] = 0
    return V, U, sigma, cluster


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` torch threads (the CPU path picks its kernels by thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
