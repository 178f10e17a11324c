"""The CPU op path against its float32 reference twin over the popularity grid."""

import numpy as np
import pytest
import torch

from vllm_jd.kernels.metadata import bucket, build_meta
from vllm_jd.kernels.reference import jd_expand_ref, jd_lora_ref, jd_shrink_ref, jd_sigma_ref
from vllm_jd.kernels.torch_ops import jd_lora_torch
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.testing.cases import POPULARITY, TOL, random_layer, token_rows


def run_case(popularity, dtype, R, C, diag, d_in, d_out, seq_lens, N=12, none_frac=0.3, seed=0):
    V, U, sigma, cluster = random_layer(len(d_out), C, N, R, d_in, d_out, diag, dtype, seed)
    rows = token_rows(popularity, len(seq_lens), seq_lens, N, none_frac, seed)
    meta = build_meta(rows, cluster, N)
    g = torch.Generator().manual_seed(seed + 1)
    T = len(rows)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    y = torch.randn(T, sum(d_out), generator=g).to(dtype)
    want = jd_lora_ref(x, y, V, U, sigma, meta.token_cluster, meta.token_row)
    got = y.clone()
    jd_lora_torch(x, got, JDLayerWeights.from_bases(V, U, sigma), meta)
    return rows, N, y, got, want


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [8, 16, 64, 128])
def test_jd_lora_torch_matches_reference(popularity, dtype, R):
    rows, N, y, got, want = run_case(popularity, dtype, R, C=3, diag=False, d_in=123, d_out=[64, 32, 32],
                                     seq_lens=[1, 1, 37, 1, 20, 5, 1, 16, 3])
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    assert torch.equal(got[rows == N], y[rows == N])  # no adapter: exactly the base output


@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("C", [1, 2, 5])
def test_clusters_and_diag(diag, C):
    rows, N, y, got, want = run_case("uniform", torch.float32, 16, C, diag, d_in=2049, d_out=[123],
                                     seq_lens=[3, 1, 17, 1, 1, 40])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert torch.equal(got[rows == N], y[rows == N])


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens", [[1] * 29, [24, 1, 1, 7, 1, 24, 1, 1, 1, 2, 1, 1, 17, 1]], ids=["decode", "mixed"])
def test_lone_tokens_and_segments_split(popularity, dtype, lens):
    # lone tokens (decode) get Σ one by one from an embedding_bag, runs (prefills) per segment
    N, C = 40, 4
    rows, _, y, got, want = run_case(popularity, dtype, 64, C, False, d_in=123, d_out=[64, 32, 32], seq_lens=lens,
                                     N=N)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    assert torch.equal(got[rows == N], y[rows == N])  # no adapter: exactly the base output
    split = build_meta(rows, random_layer(3, C, N, 64, 123, [64, 32, 32], False, dtype, 0)[3], N).cluster_grid(C).split
    cells = torch.cat([split.single_cells, split.multi_cells])
    assert sorted(cells.tolist()) == sorted(set(cells.tolist())) and len(cells) == len(rows)  # each token once
    if popularity == "distinct":  # the path under test was taken: decode tokens alone, prefills in runs
        seq_row = rows[np.cumsum([0] + lens[:-1])]
        single = split.single_rows[split.single_rows != N].tolist()
        assert sorted(single) == sorted(r for r, n in zip(seq_row, lens, strict=True) if n == 1 and r != N)
        assert split.multi_seg_row.numel() >= sum(n > 1 and r != N for r, n in zip(seq_row, lens, strict=True))


def test_prefill_sized_batch():
    lens = [24] * 64  # 64 prompts of 24 tokens: 1,536 tokens, segments cut every 16
    rows, N, y, got, want = run_case("zipf", torch.float32, 64, 8, False, d_in=256, d_out=[256, 128, 128], seq_lens=lens,
                                     N=200)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_reference_ops_semantics():
    """The twins themselves, against explicit per-token loops."""
    V, U, sigma, cluster = random_layer(2, 3, 4, 5, 7, [6, 4], False, torch.float64, 3)
    rows = np.array([0, 4, 2, 2, 3])
    meta = build_meta(rows, cluster, 4)
    x = torch.randn(5, 7, dtype=torch.float64)
    h = jd_shrink_ref(x, V, meta.token_cluster)
    g = jd_sigma_ref(h, sigma, meta.token_row)
    y = jd_expand_ref(torch.zeros(5, 10, dtype=torch.float64), g, U, meta.token_cluster)
    for t in range(5):
        c, a = int(cluster[rows[t]]), int(rows[t])
        for s, (off, d) in enumerate([(0, 6), (6, 4)]):
            want = U[s][c] @ sigma[s, a].float().double() @ V[s, c].T @ x[t]
            torch.testing.assert_close(y[t, off : off + d], want, atol=1e-5, rtol=1e-4)  # twins compute in fp32


def test_segments_cover_every_token_once():
    rows = np.array([5, 5, 5, 1, 1, 7] + [2] * 40 + [5])
    meta = build_meta(rows, np.zeros(8, dtype=np.int64), 7, chunk=16)
    flat = meta.seg_index.reshape(-1)
    assert set(flat.tolist()) == set(range(len(rows)))
    assert all(len({int(rows[i]) for i in seg}) == 1 for seg in meta.seg_index.tolist())  # one Σ row per segment
    assert meta.seg_index.shape[1] <= 16
    assert torch.equal(flat[meta.token_flat], torch.arange(len(rows)))
    assert meta.seg_row.tolist() == [int(rows[s]) for s in meta.seg_index[:, 0].tolist()]


def test_gemm_sizes_come_from_few_buckets():
    # oneDNN caches a primitive per bf16 GEMM shape: exact per-step sizes grew a worker by ~1 GB
    assert len({bucket(n) for n in range(1, 8193)}) == 48
    assert all(n <= bucket(n) <= 1.25 * n for n in range(1, 8193))
    rng = np.random.default_rng(0)
    for T in (1, 7, 37, 130, 1000):
        rows = np.repeat(rng.integers(0, 12, T), rng.integers(1, 30, T))[:T]
        meta = build_meta(rows, rng.integers(0, 3, 13), 12)
        G, L = meta.seg_index.shape
        assert G == bucket(G) and L in (1, 2, 4, 8, 16)
        grid = meta.cluster_grid(3)
        G_multi = grid.split.multi_seg_index.shape[0]
        assert grid.L == bucket(grid.L) and G_multi == bucket(G_multi)
