"""The GPU path's tile lists and byte model (pure arithmetic, no GPU, no Triton) over the
popularity cases: distinct / uniform / zipf / identical adapters; decode, mixed, prefill steps;
1 to 32 clusters."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_jd.kernels.gpu import plan
from vllm_jd.kernels.gpu.buffers import TileBuffers
from vllm_jd.kernels.gpu.decode_model import decode_step
from vllm_jd.kernels.gpu.tiles import TILE_M, build_tiles, max_cluster_tiles, max_sigma_tiles
from vllm_jd.testing.cases import POPULARITY, token_rows

N = 1024
STEPS = {"decode": [1] * 256, "mixed": [300, 700] + [1] * 62, "prefill": [2048, 1024, 512]}


def step(popularity: str, kind: str, clusters: int, seed: int = 0):
    rows = token_rows(popularity, len(STEPS[kind]), STEPS[kind], N, 0.1, seed)
    cluster_of_row = np.append(np.random.default_rng(seed).integers(0, clusters, N), 0)
    return rows, cluster_of_row


CASES = [(p, k, c) for p in POPULARITY for k in STEPS for c in (1, 8, 32)]


@pytest.mark.parametrize("popularity,kind,clusters", CASES)
def test_tiles_cover_each_adapter_token_once_within_one_cluster_and_one_row(popularity, kind, clusters):
    rows, cluster_of_row = step(popularity, kind, clusters)
    t = build_tiles(rows, cluster_of_row, N)
    adapter_tokens = np.flatnonzero(rows != N)
    assert sorted(t.order.tolist()) == adapter_tokens.tolist()  # every adapter token once, no other token
    for tiles, key_of in ((t.cluster_tiles, cluster_of_row[rows]), (t.sigma_tiles, rows)):
        covered = []
        for start, length, key in tiles:
            assert 1 <= length <= TILE_M
            toks = t.order[start:start + length]
            assert (key_of[toks] == key).all()  # one cluster (or one Σ row) per tile
            covered += toks.tolist()
        assert sorted(covered) == adapter_tokens.tolist()
    counts = np.bincount(cluster_of_row[rows[adapter_tokens]], minlength=clusters)
    assert len(t.cluster_tiles) == int((-(-counts // TILE_M)).sum())  # as few tiles as the clusters allow
    assert len(t.cluster_tiles) <= max_cluster_tiles(len(rows), clusters)
    assert len(t.sigma_tiles) <= max_sigma_tiles(len(rows), len(STEPS[kind]))


@pytest.mark.parametrize("popularity,kind,clusters", CASES)
def test_bases_once_per_tile_of_their_cluster_sigma_once_per_tile(popularity, kind, clusters):
    rows, cluster_of_row = step(popularity, kind, clusters)
    shape = plan.LayerShape(4096, (4096, 1024, 1024), 16, clusters)
    shrink, sigma, expand = plan.plan_call(rows, cluster_of_row, N, shape, max_rows=len(STEPS[kind]))
    t = build_tiles(rows, cluster_of_row, N)
    nc, ns = len(t.cluster_tiles), len(t.sigma_tiles)
    assert shrink.bases_bytes == nc * 4096 * 3 * 16 * 2  # V_c, all slices, once per cluster tile
    assert expand.bases_bytes == nc * 16 * 6144 * 2  # U_c, all slices, once per cluster tile
    assert sigma.sigma_bytes == ns * 3 * 16 * 16 * 2  # Σ once per Σ tile and slice
    _, per_row = np.unique(rows[rows != N], return_counts=True)
    assert ns == int((-(-per_row // TILE_M)).sum())  # a decode token: one Σ read; a prefill: one per tile
    for k in (shrink, sigma, expand):
        assert 0 <= k.working <= k.launched
    assert shrink.launched <= max_cluster_tiles(len(rows), clusters) * 16  # split-K at most 16
    assert expand.launched == max_cluster_tiles(len(rows), clusters) * (32 + 8 + 8)  # 128-column blocks


def test_decode_distinct_reads_bases_per_cluster_not_per_token():
    rows, cluster_of_row = step("distinct", "decode", 8)
    shape = plan.LayerShape(4096, (4096, 1024, 1024), 64, 8)
    ours = plan.plan_call(rows, cluster_of_row, N, shape, max_rows=256)
    per_adapter = plan.plan_call_per_adapter(rows, N, shape, max_segs=257)
    v_ours = ours[0].bases_bytes
    v_theirs = sum(k.bases_bytes for k in per_adapter if k.name == "shrink+sigma")
    assert v_ours <= (256 // TILE_M + 8) * 4096 * 3 * 64 * 2  # ≤ 24 tiles' worth
    assert v_theirs > 10 * v_ours
    assert sum(k.launched for k in per_adapter) > 100 * sum(k.launched for k in ours)


@pytest.mark.parametrize("batch", [64, 256])
def test_model_predicts_at_least_090_of_base_decode_throughput(batch):
    ours, earlier = decode_step(batch), decode_step(batch, kernels="per_adapter")
    assert ours["ratio"] >= 0.90, ours
    assert earlier["ratio"] < ours["ratio"]


def test_buffers_hold_a_step_and_refuse_too_much():
    rows, cluster_of_row = step("zipf", "mixed", 8)
    t = build_tiles(rows, cluster_of_row, N)
    buf = TileBuffers(len(rows), 64, "cpu")
    buf.write(t)
    assert buf.counts.tolist() == [len(t.cluster_tiles), len(t.sigma_tiles)]
    assert buf.order[:t.num_adapter_tokens].tolist() == t.order.tolist()
    assert buf.cluster_tiles[:len(t.cluster_tiles)].numpy().tolist() == t.cluster_tiles.tolist()
    with pytest.raises(ValueError, match="more than the 10 the buffers hold"):
        TileBuffers(10, 64, "cpu").write(t)
    distinct = len(set(rows[rows != N].tolist()))
    with pytest.raises(ValueError, match=f"{distinct} distinct adapters in one step, more than max_rows=2"):
        TileBuffers(len(rows), 2, "cpu").write(t)
