"""JD-Full: monotone objective, Proposition 1 (lossless at r ≥ r̃), Theorem 1's bounds."""

import pytest
import torch
from helpers import dense, random_factors

from vllm_jd.compress.jd_full import jd_full, residuals_full, sigma_full


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("rank", [3, 6, 10])
def test_objective_never_increases(seed, rank):
    res = jd_full(random_factors(seed), rank, iters=25, generator=torch.Generator().manual_seed(seed))
    steps = torch.tensor(res.losses).diff()
    assert (steps <= 1e-12).all(), f"loss went up: {res.losses}"
    assert res.losses[-1] < res.losses[0]


def test_bases_orthonormal_and_sigma_closed_form():
    f = random_factors(0)
    res = jd_full(f, 5, iters=5)
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(res.U.T @ res.U, eye, atol=1e-10)
    assert torch.allclose(res.V.T @ res.V, eye, atol=1e-10)
    P = dense(f)
    assert torch.allclose(res.sigma, res.U.T @ P @ res.V, atol=1e-10)  # eq. 6
    loss = ((P - res.U @ res.sigma @ res.V.T) ** 2).sum((1, 2))
    assert torch.allclose(residuals_full(f, res.U, res.V), loss, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lossless_at_rank_r_tilde(dtype):
    """Proposition 1: r = r̃ = Σ r_i (generic factors) reconstructs every P_i exactly."""
    f = random_factors(3, n=5, r=3, d_in=40, d_out=32, dtype=dtype)
    res = jd_full(f, 15, iters=3)
    P = dense(f)
    rec = res.U @ res.sigma @ res.V.T
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert ((rec - P).norm(dim=(1, 2)) / P.norm(dim=(1, 2))).max() < tol
    assert residuals_full(f, res.U, res.V).max() < tol**2 * 10


def test_lossy_below_r_tilde():
    f = random_factors(3, n=5, r=3, d_in=40, d_out=32)
    res = jd_full(f, 14, iters=30)
    assert residuals_full(f, res.U, res.V).sum() > 1e-6  # Proposition 1: r < r̃ ⇒ nonzero error


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rank", [2, 4, 7])
def test_theorem1_bounds(seed, rank):
    """n·Σ_{j≤r} σ̄_j(mean P)² ≤ Σ_i ‖Σ_i‖² ≤ Σ_{j≤min(r², n)} σ_j(L)².

    The paper prints the lower bound with the singular values of Σ_i P_i; its proof (Jensen) gives
    (1/n)‖Σ_i P_i‖-based values, i.e. n·σ̄(mean)² as written here, which is the provable form.
    """
    f = random_factors(seed)
    res = jd_full(f, rank, iters=30, generator=torch.Generator().manual_seed(seed))
    P = dense(f)
    captured = float((res.sigma**2).sum())
    L = P.reshape(P.shape[0], -1).T  # [d², n]: column i = vec(P_i)
    upper = float((torch.linalg.svdvals(L)[: min(rank * rank, P.shape[0])] ** 2).sum())
    lower = P.shape[0] * float((torch.linalg.svdvals(P.mean(0))[:rank] ** 2).sum())
    assert lower - 1e-9 <= captured <= upper + 1e-9
    # and the error-ratio corollary: ≥ 1 − upper / Σ‖P_i‖²
    total = float((P**2).sum())
    assert float(residuals_full(f, res.U, res.V).sum()) / total >= 1 - upper / total - 1e-9


def test_sigma_full_matches_dense():
    f = random_factors(5)
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(24, 4, generator=g, dtype=torch.float64)).Q
    assert torch.allclose(sigma_full(f, U, V), U.T @ dense(f) @ V, atol=1e-12)
