"""JD-Diag: monotone ALS, closed forms, and never better than JD-Full at the same rank."""

import pytest
import torch
from helpers import dense, random_factors

from vllm_jd.compress.jd_diag import jd_diag, losses_diag, sigma_diag
from vllm_jd.compress.jd_full import jd_full, residuals_full


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("rank", [3, 6, 10])
def test_objective_never_increases(seed, rank):
    res = jd_diag(random_factors(seed), rank, iters=25, generator=torch.Generator().manual_seed(seed))
    steps = torch.tensor(res.losses).diff()
    assert (steps <= 1e-10 * res.losses[0]).all(), f"loss went up: {res.losses}"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("rank", [3, 6, 10])
def test_diag_error_at_least_full(seed, rank):
    f = random_factors(seed)
    full = jd_full(f, rank, iters=30, generator=torch.Generator().manual_seed(seed))
    diag = jd_diag(f, rank, iters=30, generator=torch.Generator().manual_seed(seed))
    assert float(losses_diag(f, diag.U, diag.V, diag.sigma).sum()) >= float(residuals_full(f, full.U, full.V).sum()) - 1e-9


def test_loss_and_sigma_closed_forms():
    f = random_factors(1)
    res = jd_diag(f, 4, iters=5)
    P = dense(f)
    rec = res.U @ torch.diag_embed(res.sigma) @ res.V.T
    assert torch.allclose(losses_diag(f, res.U, res.V, res.sigma), ((P - rec) ** 2).sum((1, 2)), atol=1e-10)
    # σ_i is the least-squares optimum for fixed U, V: perturbing it cannot lower the loss
    s = sigma_diag(f, res.U, res.V)
    base = losses_diag(f, res.U, res.V, s)
    for eps in (1e-3, -1e-3):
        assert (losses_diag(f, res.U, res.V, s + eps) >= base - 1e-12).all()
