"""K device slots for C clusters' bases (``serving/residency.py``), without vLLM: a layer served
from slots gives exactly the all-clusters result, on-demand loading replaces the least recently
used slot, and bad tables are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_jd.kernels.metadata import build_meta
from vllm_jd.kernels.torch_ops import jd_lora_torch
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.serving.residency import EMPTY, ResidentBases

C, S, R, D_IN, D_OUT, N = 5, 2, 4, 24, (16, 8), 10


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(S, C, D_IN, R, generator=g)
    U = [torch.randn(C, d, R, generator=g) for d in D_OUT]
    sigma = torch.randn(S, N + 1, R, R, generator=g)
    sigma[:, N] = 0  # the "no adapter" row
    return JDLayerWeights.from_bases(V, U, sigma)


CLUSTER_OF_ROW = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0])  # row N (none) → cluster 0


def _run(w, rows, basis_of_row):
    x = torch.randn(len(rows), D_IN, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(len(rows), sum(D_OUT))
    jd_lora_torch(x, y, w, build_meta(np.array(rows), basis_of_row, N))
    return y


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_slots_give_the_all_clusters_result(slots):
    full = _weights()
    res = ResidentBases(slots, "cpu")
    w = res.add_layer(_weights())
    assert w.num_clusters == slots and w.V_all.shape[1] == slots * S * R
    rng = np.random.default_rng(0)
    for _ in range(6):  # a sequence of steps, each using ≤ K clusters
        clusters = rng.choice(C, size=slots, replace=False)
        rows = [r for r in range(N) if CLUSTER_OF_ROW[r] in clusters] + [N]  # plus a base token
        if rng.random() < 0.5:  # a table from the scheduler (async copy), else loaded on demand
            table = np.full(slots, EMPTY)
            table[: len(clusters)] = clusters
            res.set_table(table)
        res.ensure(CLUSTER_OF_ROW[[r for r in rows if r != N]])
        got = _run(w, rows, res.slot_of_cluster()[CLUSTER_OF_ROW])
        want = _run(full, rows, CLUSTER_OF_ROW)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got[-1] == 0).all()


def test_on_demand_loads_replace_the_least_recently_used_slot():
    res = ResidentBases(2, "cpu")
    res.add_layer(_weights())
    assert res.ensure([0]) and res.ensure([1])
    res.ensure([0])  # 0 used more recently than 1
    res.ensure([2])
    assert sorted(res.table.tolist()) == [0, 2]
    assert not res.ensure([0, 2])  # resident: nothing changes
    assert res.stats.loads == {0: 1, 1: 1, 2: 1}
    with pytest.raises(ValueError, match="3 clusters"):
        res.ensure([0, 1, 2])


def test_bad_tables_are_refused():
    res = ResidentBases(2, "cpu")
    res.add_layer(_weights())
    with pytest.raises(ValueError, match="shape"):
        res.set_table([0, 1, 2])
    with pytest.raises(ValueError, match="cluster 7"):
        res.set_table([0, 7])
    with pytest.raises(ValueError, match="≥ 1"):
        ResidentBases(0, "cpu")


def test_clusters_appended_while_serving_load_like_the_others():
    full = _weights()
    res = ResidentBases(1, "cpu")
    w = res.add_layer(_weights())
    d_in = full.V_all.shape[0]
    V_new = full.V_all.view(d_in, C, -1)[:, 2:3].permute(1, 0, 2)  # cluster 2 again, as cluster 5
    UT_new = [ut.view(C, R, -1)[2:3] for ut in full.UT]
    res.append_clusters(0, V_new, UT_new)
    assert res.num_clusters == C + 1
    res.set_table([C])
    res.ensure([C])
    rows = [4, 5]  # rows of cluster 2, read through cluster 5's copy of its bases
    got = _run(w, rows, res.slot_of_cluster()[np.where(np.arange(N + 1) >= 0, C, 0)])
    torch.testing.assert_close(got, _run(full, rows, CLUSTER_OF_ROW), rtol=1e-5, atol=1e-5)
