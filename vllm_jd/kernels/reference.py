"""Float32 reference twins of every op: per-token gathers, obviously right, slow.

Shapes: x [T, d_in]; V [S, C, d_in, R]; U: list of S tensors [C, d_s, R];
sigma [S, N+1, R, R] (full) or [S, N+1, R] (diag); token_cluster, token_row [T] long.
"""

from __future__ import annotations

import torch


def jd_shrink_ref(x: torch.Tensor, V: torch.Tensor, token_cluster: torch.Tensor) -> torch.Tensor:
    """h[t, s] = V[s, c(t)]ᵀ x[t] → [T, S, R] float32."""
    Vt = V.float()[:, token_cluster]  # [S, T, d_in, R]
    return torch.einsum("td,stdr->tsr", x.float(), Vt)


def jd_sigma_ref(h: torch.Tensor, sigma: torch.Tensor, token_row: torch.Tensor) -> torch.Tensor:
    """g[t, s] = Σ[s, a(t)] h[t, s] (full) or σ[s, a(t)] ⊙ h[t, s] (diag) → [T, S, R] float32."""
    sig = sigma.float()[:, token_row]  # [S, T, R, R] or [S, T, R]
    if sig.dim() == 3:
        return h.float() * sig.transpose(0, 1)
    return torch.einsum("stqr,tsr->tsq", sig, h.float())


def jd_expand_ref(y: torch.Tensor, g: torch.Tensor, U: list[torch.Tensor], token_cluster: torch.Tensor) -> torch.Tensor:
    """Return y with ``y[t, slice s] += U[s][c(t)] g[t, s]`` (slices laid out in order), float32 math."""
    out = y.float().clone()
    off = 0
    for s, u in enumerate(U):
        Ut = u.float()[token_cluster]  # [T, d_s, R]
        out[:, off : off + u.shape[1]] += torch.einsum("tdr,tr->td", Ut, g[:, s].float())
        off += u.shape[1]
    return out.to(y.dtype)


def jd_lora_ref(x: torch.Tensor, y: torch.Tensor, V: torch.Tensor, U: list[torch.Tensor], sigma: torch.Tensor,
                token_cluster: torch.Tensor, token_row: torch.Tensor) -> torch.Tensor:
    """The whole layer: y + U Σ Vᵀ x per token (float32 math, output in y's dtype)."""
    h = jd_shrink_ref(x, V, token_cluster)
    return jd_expand_ref(y, jd_sigma_ref(h, sigma, token_row), U, token_cluster)
