"""JD-Diag: unconstrained shared U, V and a diagonal Σ_i per adapter (paper eq. 3, §2.4).

Alternating least squares ("triple least squares"), each step the closed-form minimiser of a
convex subproblem, so the loss never increases:

    U = (Σ_i P_i V D_i) (VᵀV ∘ Σ_i σ_iσ_iᵀ)⁻¹
    V = (Σ_i P_iᵀ U D_i) (UᵀU ∘ Σ_i σ_iσ_iᵀ)⁻¹
    σ_i = (UᵀU ∘ VᵀV)⁻¹ diag(Uᵀ P_i V)

with D_i = diag(σ_i). After each sweep the columns of U and V are scaled to unit norm and the
scale moved into σ (the loss is unchanged; it keeps the r×r systems well conditioned).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_jd.compress.factors import ModuleFactors
from vllm_jd.compress.jd_full import JDResult, hosvd_init


def _solve_sym(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``rhs @ gram⁻¹`` for symmetric PSD gram [r, r], rhs [..., r]; a 1e-10 ridge guards a
    column whose σ is zero for every adapter (then gram is singular)."""
    ridge = 1e-10 * gram.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, rhs.transpose(-1, -2)).transpose(-1, -2)


def sigma_diag(f: ModuleFactors, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Closed-form diagonal Σ_i for fixed U, V: [n, r] = (UᵀU ∘ VᵀV)⁻¹ diag(Uᵀ P_i V)."""
    bu, av = f.shrink(U, V)
    d = (bu * av).sum(1)  # diag(Uᵀ P_i V) = Σ_k (B_iᵀU)_{kj} (A_iV)_{kj}
    return _solve_sym((U.T @ U) * (V.T @ V), d)


def losses_diag(f: ModuleFactors, U: torch.Tensor, V: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``‖P_i − U diag(σ_i) Vᵀ‖²_F`` for all i, [n] float64.

    = ‖P_i‖² − 2 σ_iᵀ diag(UᵀP_iV) + σ_iᵀ (UᵀU ∘ VᵀV) σ_i.
    """
    bu, av = f.shrink(U, V)
    d = (bu * av).sum(1).double()
    g = ((U.T @ U) * (V.T @ V)).double()
    s = sigma.double()
    return (f.norms() ** 2 - 2 * (s * d).sum(1) + ((s @ g) * s).sum(1)).clamp_min(0)


def jd_diag(f: ModuleFactors, rank: int, iters: int = 10, tol: float | None = None,
            generator: torch.Generator | None = None,
            init: tuple[torch.Tensor, torch.Tensor] | None = None,
            on_iter: Callable[[], None] | None = None) -> JDResult:
    """JD-Diag of the n updates in ``f`` at ``rank``: U [d_out, r], V [d_in, r], σ [n, r].

    ``tol`` stops early when the relative loss decrease of a sweep falls below it.
    """
    generator = generator or torch.Generator().manual_seed(0)
    U, V = init if init is not None else hosvd_init(f, rank, generator)
    n, r = f.A.shape[:2]
    A2, B2 = f.A.reshape(n * r, -1), f.Bt.reshape(n * r, -1)
    sigma = sigma_diag(f, U, V)
    losses = [float(losses_diag(f, U, V, sigma).sum())]
    for _ in range(iters):
        ss = sigma.T @ sigma  # Σ_i σ_iσ_iᵀ
        av = (A2 @ V).view(n, r, rank)
        U = _solve_sym((V.T @ V) * ss, B2.T @ (av * sigma[:, None, :]).view(n * r, rank))
        bu = (B2 @ U).view(n, r, rank)
        V = _solve_sym((U.T @ U) * ss, A2.T @ (bu * sigma[:, None, :]).view(n * r, rank))
        sigma = sigma_diag(f, U, V)
        nu, nv = U.norm(dim=0).clamp_min(1e-30), V.norm(dim=0).clamp_min(1e-30)
        U, V, sigma = U / nu, V / nv, sigma * (nu * nv)
        losses.append(float(losses_diag(f, U, V, sigma).sum()))
        if on_iter is not None:
            on_iter()
        if tol is not None and losses[-2] - losses[-1] <= tol * max(losses[-2], 1e-30):
            break
    return JDResult(U, V, sigma, losses)
