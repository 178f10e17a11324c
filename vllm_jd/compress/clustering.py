"""Clustered JD (paper §2.8, App. A.3): which adapters share a basis.

JD on all adapters, k-means on their Σ_i, then alternate: per-cluster JD (step 1), and move
each adapter to the cluster whose basis reconstructs it best (step 2), until no assignment
changes. One assignment holds for every module of an adapter, so serving needs one cluster id
per adapter and a scheduler can keep whole clusters resident (design choice; the paper does not
say whether clusters differ per module). Assignments are computed on *reference* modules (by
default the middle layer's), so memory stays bounded by one layer of factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_jd.compress import solvers
from vllm_jd.compress.factors import ModuleFactors
from vllm_jd.compress.kmeans import kmeans


@dataclass
class Reference:
    """A reference module: normalised factors of the adapters that have it.

    f: unit-norm factors of k adapters; present: [k] long indices into all n adapters;
    norms: [k] float64 original ‖P_i‖_F (for aggregating errors over modules).
    """

    f: ModuleFactors
    present: torch.Tensor
    norms: torch.Tensor


@dataclass
class Clustering:
    """labels: [n] long cluster of each adapter; errors: [n] aggregate relative error on the
    reference modules under the final bases; rounds: step-1/step-2 rounds run."""

    labels: torch.Tensor
    errors: torch.Tensor
    rounds: int


def _fill_empty(labels: torch.Tensor, cost: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster the worst-fitted adapter of a cluster with ≥ 2 members."""
    labels = labels.clone()
    for c in range(k):
        if bool((labels == c).any()):
            continue
        counts = torch.bincount(labels, minlength=k)
        movable = counts[labels] >= 2
        if not bool(movable.any()):
            break
        worst = torch.where(movable, cost, torch.full_like(cost, -1.0)).argmax()
        labels[worst] = c
    return labels


def assignment_costs(method: str, refs: list[Reference], bases: list[list], n: int) -> torch.Tensor:
    """Squared error of every adapter under every cluster, weighted by ‖P_i,m‖²: [n, k] float64.

    bases[c][m] is (U, V) of cluster c on reference m, or None (cluster c cannot represent
    module m: the loss is then all of ‖P_i,m‖²).
    """
    k = len(bases)
    cost = torch.zeros(n, k, dtype=torch.float64)
    for m, ref in enumerate(refs):
        w = ref.norms**2
        for c in range(k):
            if bases[c][m] is None:
                loss = torch.ones_like(w)  # unit-norm updates: nothing reconstructed
            else:
                loss = solvers.projection_losses(method, ref.f, *bases[c][m]).cpu()
            cost[ref.present, c] += loss * w
    return cost


def relative_errors(cost: torch.Tensor, refs: list[Reference], n: int) -> torch.Tensor:
    """Aggregate relative error per adapter from squared costs [n]: sqrt(cost / Σ_m ‖P_i,m‖²)."""
    total = torch.zeros(n, dtype=torch.float64)
    for ref in refs:
        total[ref.present] += ref.norms**2
    return torch.where(total > 0, (cost / total.clamp_min(1e-300)).sqrt(), torch.zeros_like(total))


def cluster(method: str, refs: list[Reference], n: int, rank: int, k: int, iters: int,
            tol: float | None, generator: torch.Generator, max_rounds: int = 10,
            on_iter: Callable[[], None] | None = None) -> Clustering:
    """Assign n adapters to k clusters by clustered JD on the reference modules."""
    if k <= 1:
        bases = [[(r.U, r.V) for r in (solvers.fit(method, ref.f, rank, iters, tol, generator,
                                                     on_iter=on_iter) for ref in refs)]]
        cost = assignment_costs(method, refs, bases, n)
        return Clustering(torch.zeros(n, dtype=torch.long), relative_errors(cost[:, 0], refs, n), 0)
    features = torch.zeros(n, 0, dtype=torch.float64)
    for ref in refs:
        res = solvers.fit(method, ref.f, rank, iters, tol, generator, on_iter=on_iter)
        block = torch.zeros(n, res.sigma[0].numel(), dtype=torch.float64)
        block[ref.present] = res.sigma.reshape(ref.f.n, -1).double().cpu()
        features = torch.cat([features, block], 1)
    labels = kmeans(features, k, generator)
    prev: list[list] = [[None] * len(refs) for _ in range(k)]
    cost = torch.zeros(n, k, dtype=torch.float64)
    rounds = 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007  (read after the loop: rounds run)
        labels = _fill_empty(labels, cost.gather(1, labels[:, None]).squeeze(1), k)
        bases: list[list] = []
        for c in range(k):
            row = []
            for m, ref in enumerate(refs):
                members = (labels[ref.present] == c).nonzero().squeeze(1)
                if members.numel() == 0:
                    row.append(None)
                    continue
                res = solvers.fit(method, ref.f.subset(members.to(ref.f.A.device)), rank, iters, tol,
                                  generator, init=prev[c][m], on_iter=on_iter)
                row.append((res.U, res.V))
            bases.append(row)
        prev = bases
        cost = assignment_costs(method, refs, bases, n)
        new = cost.argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    errors = relative_errors(cost.gather(1, labels[:, None]).squeeze(1), refs, n)
    return Clustering(labels, errors, rounds)
