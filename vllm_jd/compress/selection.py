"""Pick rank and cluster count from reconstruction error (paper 001 §6.4, App. F).

The paper's recipe, run on the reference (middle-layer) modules only:
- ≤ 100 adapters: one cluster at rank ⌈n/2⌉ + 7, if its mean error is below the target and its
  Σ_i costs at most ``SIGMA_SHARE`` of the mean adapter (``one_cluster_cap``; ours, not the paper's);
- otherwise rank 16 and the smallest cluster count in 1, 2, 4, 8, … whose mean error is below
  the target (``--max-error``, default ``config.RECIPE_MAX_ERROR`` = 0.5; the paper: "below 0.5
  reconstruction loss reliably translates into preserving 99% or more of the LoRA performance";
  on our trained zoo it kept 94–97% below and 80–86% above, docs/quality.md).
With a fixed rank only the cluster count is searched; with a fixed cluster count the rank is
doubled from 16. k = n clusters at rank ≥ r_i is lossless, so the cluster search always ends.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from vllm_jd.compress.clustering import Clustering, Reference, cluster
from vllm_jd.compress.factors import load_module, normalize

logger = logging.getLogger(__name__)

RECIPE_RANK = 16
"""The paper's rank for the cluster search (001 §6.4)."""


SIGMA_SHARE = 0.25
"""The one-cluster rule is skipped when its Σ_i (r² per module for JD-Full, r for JD-Diag) would
exceed this share of the mean adapter's parameters per module. The paper's models are wide
(Σ_i at rank 57 is 2.5% of a rank-16 Mistral-7B adapter); on hidden 128 the rule's rank-55 Σ_i
was 1.3× a rank-9 adapter and the store saved −63% (docs/quality.md)."""


@dataclass
class Choice:
    rank: int
    clusters: int
    clustering: Clustering
    tried: list[tuple[int, int, float]]
    """(rank, clusters, mean reference error) of every setting evaluated, in order."""


def choose(method: str, refs: list[Reference], n: int, rank: int | None, clusters: int | None,
           max_error: float, max_rank: int, iters: int, tol: float | None, seed: int,
           max_rounds: int = 10, on_iter=None, one_cluster_max: int | None = None) -> Choice:
    """Resolve ``rank``/``clusters`` given as None ("auto") by the recipe above.

    max_rank: the smallest module dimension (a rank above it is invalid); one_cluster_max: the
    largest rank the one-cluster rule may take (``one_cluster_cap``; None: no bound).
    """
    tried: list[tuple[int, int, float]] = []

    def run(r: int, k: int) -> Clustering:
        result = cluster(method, refs, n, r, k, iters, tol, torch.Generator().manual_seed(seed), max_rounds, on_iter)
        err = float(result.errors.mean())
        tried.append((r, k, err))
        logger.info("auto: rank %d, %d clusters → mean reference error %.4f", r, k, err)
        return result

    if rank is not None and clusters == 1:  # nothing to choose: the module pass fits the one cluster
        return Choice(rank, 1, Clustering(torch.zeros(n, dtype=torch.long), torch.full((n,), float("nan")), 0), tried)
    if rank is not None and clusters is not None:  # only the assignment to clusters is computed here
        result = cluster(method, refs, n, rank, clusters, iters, tol, torch.Generator().manual_seed(seed), max_rounds,
                         on_iter)
        return Choice(rank, clusters, result, tried)
    if clusters is not None:
        r = min(RECIPE_RANK, max_rank)
        while True:
            res = run(r, clusters)
            if float(res.errors.mean()) < max_error or r >= max_rank:
                return Choice(r, clusters, res, tried)
            r = min(2 * r, max_rank)
    if rank is None and n <= 100:
        r = min((n + 1) // 2 + 7, max_rank)
        if one_cluster_max is not None and r > one_cluster_max:
            logger.info("auto: one cluster at rank %d skipped: its Σ_i would cost more than %.0f%% of the mean "
                        "adapter", r, 100 * SIGMA_SHARE)
        elif float((res := run(r, 1)).errors.mean()) < max_error:
            return Choice(r, 1, res, tried)
    r = rank if rank is not None else min(RECIPE_RANK, max_rank)
    k = 1
    while True:
        res = run(r, k)
        if float(res.errors.mean()) < max_error or k >= n:
            return Choice(r, k, res, tried)
        k = min(2 * k, n)


def one_cluster_cap(method: str, adapters: list) -> int:
    """The largest rank whose Σ_i is at most ``SIGMA_SHARE`` of the mean adapter's parameters per
    module it has (``a.lora_params / len(a.modules)``)."""
    per_module = sum(a.lora_params / max(len(a.modules), 1) for a in adapters) / max(len(adapters), 1)
    budget = SIGMA_SHARE * per_module
    return int(budget) if method == "jd-diag" else int(budget ** 0.5)


def reference_modules(modules: list) -> list[str]:
    """The middle layer's modules (paper: "select a LoRA module from the middle of the network")."""
    layers = sorted({int(m.group(1)) for mi in modules if (m := re.search(r"\.(\d+)\.", mi.name))})
    if not layers:
        return [modules[len(modules) // 2].name]
    mid = layers[len(layers) // 2]
    return [mi.name for mi in modules if re.search(rf"\.{mid}\.", mi.name)]


def load_references(adapters: list, names: list[str], device: str) -> list[Reference]:
    """The reference modules' factors of every adapter, normalised (what the recipe clusters)."""
    refs = []
    for m in names:
        f, present = load_module(adapters, m, device)
        fn, norms = normalize(f)
        refs.append(Reference(fn, present, norms.cpu()))
    return refs


def choose_svd_rank(refs: list[Reference], n: int, config, max_rank: int) -> Choice:
    """For --method svd: the given rank, or the smallest power of two below --max-error."""
    from vllm_jd.compress.clustering import relative_errors
    from vllm_jd.compress.svd import truncated_svd

    def errors(r: int) -> torch.Tensor:
        cost = torch.zeros(n, dtype=torch.float64)
        for ref in refs:
            _, s, _ = truncated_svd(ref.f, r)
            cost[ref.present] += (1 - (s.double().cpu() ** 2).sum(1)).clamp_min(0) * ref.norms**2
        return relative_errors(cost, refs, n)

    tried = []
    r = config.rank or 1
    while True:
        e = errors(r)
        tried.append((r, n, float(e.mean())))
        if config.rank is not None or float(e.mean()) < config.max_error or r >= max_rank:
            return Choice(r, n, Clustering(torch.arange(n), e, 0), tried)
        r = min(2 * r, max_rank)
