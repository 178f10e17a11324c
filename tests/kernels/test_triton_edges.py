"""Edge cases of the GPU kernels under TRITON_INTERPRET=1 against jd_lora_ref (run by
test_triton.py's parent test in its interpreter child): 1–4 slices of odd widths, ranks 1–512,
split-K over a ragged d_in, non-contiguous x and y, single tokens, one cluster of 25 or 64 used,
tile buffers reused, the tile bound reached, and every size 1 (Triton specialises such values)."""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

from vllm_jd.kernels.gpu import config
from vllm_jd.kernels.gpu.buffers import TileBuffers
from vllm_jd.kernels.gpu.tiles import build_tiles, max_cluster_tiles
from vllm_jd.kernels.reference import jd_lora_ref
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.testing.cases import TOL, random_layer, token_rows

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")


@pytest.fixture(scope="module")
def gpu():
    return importlib.import_module("vllm_jd.kernels.gpu.jd_triton")


def run(gpu, rows, N, cluster, V, U, sigma, dtype, pad=0, x_layout="contig", tiles=None, seed=0, max_rows=256):
    T = len(rows) + pad
    all_rows = np.concatenate([rows, np.full(pad, N)]).astype(np.int64)
    g = torch.Generator().manual_seed(seed + 11)
    d_in = V.shape[2]
    if x_layout == "transposed":
        x = torch.randn(d_in, T, generator=g).to(dtype).t()
    elif x_layout == "sliced":
        x = torch.randn(T, 2 * d_in + 3, generator=g).to(dtype)[:, 3 : 3 + 2 * d_in : 2]
    else:
        x = torch.randn(T, d_in, generator=g).to(dtype)
    D = sum(u.shape[1] for u in U)
    y = torch.randn(T, D, generator=g).to(dtype)
    want = jd_lora_ref(x, y, V, U, sigma, torch.from_numpy(cluster[all_rows]), torch.from_numpy(all_rows))
    before = y.clone()
    if tiles is None:
        tiles = TileBuffers(max(len(rows), 1), max_rows, "cpu")
    tiles.write(build_tiles(rows, cluster, N))
    gpu.jd_lora_gpu(x, y, JDLayerWeights.from_bases(V, U, sigma), tiles)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), want.float(), atol=atol, rtol=rtol)
    none = torch.from_numpy(all_rows == N)
    assert torch.equal(y[none], before[none])


SHAPES = [  # (S, widths, R, d_in)
    (1, (33,), 1, 40),
    (1, (130,), 3, 70),
    (2, (200, 17), 17, 123),
    (4, (1, 3, 17, 129), 3, 50),
    (4, (16, 16, 16, 16), 512, 33),
    (3, (257, 64, 1), 17, 300),
    (2, (64, 64), 512, 97),
]


@pytest.mark.parametrize("S,widths,R,d_in", SHAPES)
@pytest.mark.parametrize("dtype,diag", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                        (torch.float16, True)])
def test_slices_ranks_widths(gpu, S, widths, R, d_in, dtype, diag):
    N = 12
    V, U, sigma, cluster = random_layer(S, 3, N, R, d_in, list(widths), diag, dtype, 1)
    rows = token_rows("zipf", 6, [1, 18, 1, 3, 1, 2], N, 0.2, 4)
    run(gpu, rows, N, cluster, V, U, sigma, dtype, pad=3)


@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_in", [4100, 2049, 1000])
def test_split_k_with_ragged_d_in(gpu, diag, dtype, d_in):
    N = 6
    V, U, sigma, cluster = random_layer(3, 2, N, 8, d_in, [24, 8, 8], diag, dtype, 2)
    rows = np.array([0, 1, 6, 2, 3])
    cfg = config.choose(len(rows), max_cluster_tiles(len(rows), 2), d_in, 3, 8, 2 if dtype != torch.float32 else 4)
    assert cfg.split_k > 1 and d_in % cfg.k_per_split != 0
    run(gpu, rows, N, cluster, V, U, sigma, dtype, pad=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_layout", ["transposed", "sliced"])
def test_non_contiguous_x(gpu, dtype, x_layout):
    N = 10
    V, U, sigma, cluster = random_layer(3, 3, N, 16, 123, [40, 24, 24], False, dtype, 3)
    rows = token_rows("uniform", 8, [1, 5, 1, 17, 1, 1, 9, 2], N, 0.25, 0)
    run(gpu, rows, N, cluster, V, U, sigma, dtype, pad=4, x_layout=x_layout)


@pytest.mark.parametrize("diag", [False, True])
def test_single_token(gpu, diag):
    V, U, sigma, cluster = random_layer(3, 4, 8, 17, 77, [20, 5, 5], diag, torch.float32, 5)
    run(gpu, np.array([3]), 8, cluster, V, U, sigma, torch.float32)
    run(gpu, np.array([3]), 8, cluster, V, U, sigma, torch.float32, pad=40)


def test_all_tokens_one_cluster_and_one_of_25(gpu):
    N = 50
    V, U, sigma, cluster = random_layer(2, 25, N, 16, 64, [48, 16], False, torch.bfloat16, 6)
    cluster = np.append(np.arange(N) % 25, 0)
    rows = np.array([7, 32] * 20 + [N] * 3)  # rows 7 and 32: both cluster 7
    run(gpu, rows, N, cluster, V, U, sigma, torch.bfloat16, pad=7)
    cluster1 = np.zeros(N + 1, dtype=np.int64)  # every row cluster 0 of 25
    run(gpu, token_rows("uniform", 30, [1] * 28 + [20, 5], N, 0.1, 1), N, cluster1, V, U, sigma, torch.bfloat16)


def test_buffers_reused_large_then_small_step(gpu):
    N = 20
    V, U, sigma, cluster = random_layer(3, 4, N, 16, 64, [32, 16, 16], False, torch.float32, 7)
    tiles = TileBuffers(200, 64, "cpu")
    run(gpu, token_rows("distinct", 60, [1] * 50 + [15] * 10, N, 0.0, 2), N, cluster, V, U, sigma,
        torch.float32, tiles=tiles)
    run(gpu, np.array([4, N, 4]), N, cluster, V, U, sigma, torch.float32, pad=5, tiles=tiles)


def test_max_tiles_bound_reached(gpu):
    """Every cluster with 17 tokens: 2 tiles per cluster, the count at its bound."""
    N, C = 8, 8
    V, U, sigma, cluster = random_layer(1, C, N, 16, 32, [16], False, torch.float32, 8)
    cluster = np.append(np.arange(N), 0)
    rows = np.repeat(np.arange(N), 17)
    t = build_tiles(rows, cluster, N)
    assert len(t.cluster_tiles) == 16 <= max_cluster_tiles(len(rows), C)
    run(gpu, rows, N, cluster, V, U, sigma, torch.float32)


def test_transposed_y_and_plain_sigma_layout_and_last_of_64_clusters(gpu):
    N, C, R = 70, 64, 512
    V, U, sigma, cluster = random_layer(3, C, N, R, 20, [17, 16, 3], False, torch.float32, 9)
    cluster = np.append(np.arange(N) % C, 0)
    rows = np.array([63, 63, 0, N, 127 % N, 63])
    T = len(rows) + 2
    all_rows = np.concatenate([rows, [N, N]])
    x = torch.randn(T, 20)
    y = torch.randn(sum([17, 16, 3]), T).t()  # stride_yn = T
    want = jd_lora_ref(x, y, V, U, sigma, torch.from_numpy(cluster[all_rows]), torch.from_numpy(all_rows))
    w = JDLayerWeights.from_bases(V, U, sigma)
    w.sigma = w.sigma.contiguous()  # standard layout instead of transposed
    tiles = TileBuffers(len(rows), 8, "cpu")
    tiles.write(build_tiles(rows, cluster, N))
    gpu.jd_lora_gpu(x, y, w, tiles)
    torch.testing.assert_close(y, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_ones(gpu, dtype):
    V, U, sigma, cluster = random_layer(1, 1, 1, 1, 1, [1], False, dtype, 10)
    run(gpu, np.array([0]), 1, cluster, V, U, sigma, dtype)
