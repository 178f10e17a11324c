"""Clustered JD finds planted groups; empty clusters are refilled; the auto recipe terminates."""

import torch
from helpers import TINY_MODULES

from vllm_jd.compress.clustering import Reference, _fill_empty
from vllm_jd.compress.factors import ModuleFactors, normalize
from vllm_jd.compress.kmeans import kmeans
from vllm_jd.compress.peft_io import discover, open_adapter
from vllm_jd.compress.selection import SIGMA_SHARE, choose, load_references, one_cluster_cap, reference_modules
from vllm_jd.store.format import ModuleInfo


def same_partition(labels: list[int], truth: list[int]) -> bool:
    groups = lambda lab: sorted(sorted(i for i, x in enumerate(lab) if x == g) for g in set(lab))  # noqa: E731
    return groups(labels) == groups(truth)


def test_planted_groups_recovered(planted_adapters):
    adapters = [open_adapter(n, p) for n, p in discover([planted_adapters])]
    refs = load_references(adapters, reference_modules([ModuleInfo(name=m, d_in=a, d_out=b)
                                                        for m, (a, b) in TINY_MODULES.items()]), "cpu")
    choice = choose("jd-full", refs, len(adapters), rank=4, clusters=3, max_error=0.5, max_rank=32,
                    iters=10, tol=None, seed=0)
    assert same_partition(choice.clustering.labels.tolist(), [i % 3 for i in range(len(adapters))])
    assert float(choice.clustering.errors.max()) < 1e-3


def test_planted_diagonal_groups_recovered_by_jd_diag():
    """JD-Diag's model is P_i = U_g diag(σ_i) V_gᵀ; planted so, its groups come back exactly."""
    g = torch.Generator().manual_seed(0)
    n, r, d_in, d_out = 30, 4, 40, 36
    bases = [(torch.randn(d_out, r, generator=g, dtype=torch.float64),
              torch.randn(d_in, r, generator=g, dtype=torch.float64)) for _ in range(3)]
    A = torch.stack([bases[i % 3][1].T for i in range(n)])
    Bt = torch.stack([(bases[i % 3][0] * torch.randn(r, generator=g, dtype=torch.float64)).T for i in range(n)])
    fn, norms = normalize(ModuleFactors(A, Bt))
    refs = [Reference(fn, torch.arange(n), norms)]
    choice = choose("jd-diag", refs, n, rank=4, clusters=3, max_error=0.5, max_rank=36, iters=20, tol=None, seed=0)
    assert same_partition(choice.clustering.labels.tolist(), [i % 3 for i in range(n)])
    assert float(choice.clustering.errors.max()) < 1e-3


def test_auto_clusters_doubles_until_error_below_target(planted_adapters):
    adapters = [open_adapter(n, p) for n, p in discover([planted_adapters])]
    refs = load_references(adapters, ["model.layers.1.self_attn.q_proj"], "cpu")
    choice = choose("jd-full", refs, len(adapters), rank=4, clusters=None, max_error=0.05, max_rank=32,
                    iters=10, tol=None, seed=0)
    counts = [k for _, k, _ in choice.tried]
    assert counts == [1, 2, 4][: len(counts)] and choice.clusters == counts[-1]
    assert choice.tried[-1][2] < 0.05 and all(e >= 0.05 for _, _, e in choice.tried[:-1])


def test_one_cluster_rule_needs_sigma_smaller_than_the_adapters(planted_adapters):
    """≤ 100 adapters: the rule's rank ⌈n/2⌉ + 7 is tried first only while its Σ_i (r²) costs at most
    SIGMA_SHARE of the mean adapter; otherwise the cluster search at rank 16 starts at once."""
    adapters = [open_adapter(n, p) for n, p in discover([planted_adapters])]
    n, rule = len(adapters), (len(adapters) + 1) // 2 + 7
    per_module = sum(a.lora_params / len(a.modules) for a in adapters) / n
    cap = one_cluster_cap("jd-full", adapters)
    assert cap == int((SIGMA_SHARE * per_module) ** 0.5) and one_cluster_cap("jd-diag", adapters) >= cap ** 2
    refs = load_references(adapters, ["model.layers.1.self_attn.q_proj"], "cpu")
    run = lambda cap: choose("jd-full", refs, n, rank=None, clusters=None, max_error=0.5, max_rank=32,  # noqa: E731
                             iters=5, tol=None, seed=0, one_cluster_max=cap).tried
    assert run(rule)[0][:2] == (rule, 1)
    assert run(rule - 1)[0][:2] == (16, 1) and all(r == 16 for r, _, _ in run(rule - 1))


def test_reference_modules_are_the_middle_layer():
    mods = [ModuleInfo(name=m, d_in=a, d_out=b) for m, (a, b) in TINY_MODULES.items()]
    assert reference_modules(mods) == [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]


def test_fill_empty_moves_worst_adapter():
    labels = torch.tensor([0, 0, 0, 1])
    cost = torch.tensor([0.1, 0.9, 0.2, 0.5], dtype=torch.float64)
    out = _fill_empty(labels, cost, 3)
    assert out.tolist() == [0, 2, 0, 1]


def test_kmeans_separates_blobs_and_no_empty_group():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 3, generator=g) + 10 * k for k in range(4)])
    labels = kmeans(x, 4, torch.Generator().manual_seed(1))
    assert same_partition(labels.tolist(), [i // 20 for i in range(80)])
    assert torch.bincount(kmeans(torch.zeros(5, 2), 3, g), minlength=3).min() >= 1
