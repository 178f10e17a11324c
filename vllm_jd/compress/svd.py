"""Per-adapter truncated SVD (the paper's r-SVD baseline, §2.1) and exact singleton clusters.

Both work on the compact form of each update: QR of ``B_i`` and ``A_iᵀ`` gives
``P_i = Q_B K_i Q_Aᵀ`` with ``K_i = R_B R_Aᵀ`` of size r_i × r_i, so an SVD costs r_i³,
not d². Any single LoRA is exactly a cluster of its own at rank r_i (design: lossless fallback).
"""

from __future__ import annotations

import torch

from vllm_jd.compress.factors import ModuleFactors


def compact(f: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``P_i = Q_B[i] K[i] Q_A[i]ᵀ``: Q_B [n, d_out, r], K [n, r, r], Q_A [n, d_in, r]."""
    q_b, r_b = torch.linalg.qr(f.Bt.transpose(1, 2), mode="reduced")
    q_a, r_a = torch.linalg.qr(f.A.transpose(1, 2), mode="reduced")
    return q_b, r_b @ r_a.transpose(1, 2), q_a


def truncated_svd(f: ModuleFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of each P_i (Eckart–Young).

    Returns U [n, d_out, k], σ [n, k], V [n, d_in, k] with k = min(rank, r_max) and
    ``P_i ≈ U[i] diag(σ[i]) V[i]ᵀ``; singular values in descending order.
    """
    q_b, k, q_a = compact(f)
    w, s, zt = torch.linalg.svd(k)
    k_keep = min(rank, s.shape[1])
    return q_b @ w[:, :, :k_keep], s[:, :k_keep], q_a @ zt.transpose(1, 2)[:, :, :k_keep]


def exact_full(f: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact JD-Full form of each P_i at its own rank: U [n, d_out, r], Σ [n, r, r], V [n, d_in, r]."""
    q_b, k, q_a = compact(f)
    return q_b, k, q_a


def exact_diag(f: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact diagonal form of each P_i (its full SVD): U [n, d_out, r], σ [n, r], V [n, d_in, r]."""
    return truncated_svd(f, f.A.shape[1])
