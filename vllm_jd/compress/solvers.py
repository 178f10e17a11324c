"""The JD methods behind one interface: fit a basis, project onto it, measure the loss.

``method`` is ``"jd-full"`` (orthonormal U, V; Σ_i [r, r]) or ``"jd-diag"`` (free U, V;
Σ_i [r]). Losses are squared Frobenius residuals ``‖P_i − U Σ_i Vᵀ‖²`` in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_jd.compress.factors import ModuleFactors
from vllm_jd.compress.jd_diag import jd_diag, losses_diag, sigma_diag
from vllm_jd.compress.jd_full import JDResult, jd_full, projection_loss_full, residuals_full, sigma_full

JD_METHODS = ("jd-full", "jd-diag")


def fit(method: str, f: ModuleFactors, rank: int, iters: int, tol: float | None,
        generator: torch.Generator, init: tuple[torch.Tensor, torch.Tensor] | None = None,
        on_iter: Callable[[], None] | None = None) -> JDResult:
    """Joint diagonalization of the n updates in ``f`` at ``rank`` by ``method``."""
    solver = {"jd-full": jd_full, "jd-diag": jd_diag}[method]
    return solver(f, rank, iters=iters, tol=tol, generator=generator, init=init, on_iter=on_iter)


def project(method: str, f: ModuleFactors, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Best Σ_i for fixed U, V: ``UᵀP_iV`` [n, r, r] (full) or the closed-form diagonal [n, r]."""
    return sigma_full(f, U, V) if method == "jd-full" else sigma_diag(f, U, V)


def projection_losses(method: str, f: ModuleFactors, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``min_Σ ‖P_i − U Σ Vᵀ‖²`` for every adapter in ``f``: [n] float64 (fast, for assignment)."""
    if method == "jd-full":
        return projection_loss_full(f, U, V)
    return losses_diag(f, U, V, sigma_diag(f, U, V))


def final_losses(method: str, f: ModuleFactors, U: torch.Tensor, V: torch.Tensor,
                 sigma: torch.Tensor) -> torch.Tensor:
    """Accurate ``‖P_i − U Σ_i Vᵀ‖²`` of a finished fit: [n] float64 (exact residual for full)."""
    if method == "jd-full":
        return residuals_full(f, U, V)
    return losses_diag(f, U, V, sigma)
