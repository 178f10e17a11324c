"""The GPU kernels (``kernels/gpu/jd_triton.py``) under TRITON_INTERPRET=1 (no GPU here) against
the float32 reference twins.

Odd shapes (d_in 123 and 2049, slices 40/24/24), fp32/bf16/fp16, ranks 8–512, the four
popularity cases, 1 to 25 clusters, tokens without an adapter mixed in (their output must stay
exact), padded rows, a strided y, and a real step (256 sequences: a 2,048-token prefill among
decodes). Under the interpreter bf16 dots are widened to fp32 (see jd_triton.py).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vllm_jd.kernels.gpu import config, selfcheck
from vllm_jd.kernels.gpu.buffers import TileBuffers
from vllm_jd.kernels.gpu.tiles import build_tiles
from vllm_jd.kernels.reference import jd_lora_ref
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.testing.cases import POPULARITY, TOL, random_layer, token_rows

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
under_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run by test_kernels_under_triton_interpreter in a "
                                                                 "child process with TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETED, reason="this is the parent")
def test_kernels_under_triton_interpreter():
    """Triton fixes interpreter mode when it is imported (its standard library is decorated then),
    and this process imported it long ago; so the kernel tests run in a child process."""
    edges = os.path.join(os.path.dirname(__file__), "test_triton_edges.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, edges],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.fixture(scope="module")
def gpu():
    return importlib.import_module("vllm_jd.kernels.gpu.jd_triton")


def run_case(gpu, rows, N, cluster, V, U, sigma, dtype, pad=0, y_stride_extra=0, seed=0):
    """Run jd_lora_gpu on tokens ``rows`` (+ ``pad`` unmapped rows of x, y a view into a wider
    tensor when ``y_stride_extra``); assert it matches the twin and leaves no-adapter rows exact."""
    T = len(rows) + pad
    all_rows = np.concatenate([rows, np.full(pad, N)])
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(T, V.shape[2], generator=g).to(dtype)
    D = sum(u.shape[1] for u in U)
    wide = torch.randn(T, D + y_stride_extra, generator=g).to(dtype)
    y = wide[:, :D]
    want = jd_lora_ref(x, y, V, U, sigma, torch.from_numpy(cluster[all_rows]), torch.from_numpy(all_rows))
    before = wide.clone()
    tiles = TileBuffers(max(len(rows), 1), 256, "cpu")
    tiles.write(build_tiles(rows, cluster, N))
    gpu.jd_lora_gpu(x, y, JDLayerWeights.from_bases(V, U, sigma), tiles)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), want.float(), atol=atol, rtol=rtol)
    none = torch.from_numpy(all_rows == N)
    assert torch.equal(y[none], before[:, :D][none])  # tokens without an adapter: untouched
    assert torch.equal(wide[:, D:], before[:, D:])  # columns beyond y: untouched


def layer(dtype, R, C=3, diag=False, d_in=123, d_out=(40, 24, 24), N=10, seed=0):
    return random_layer(len(d_out), C, N, R, d_in, list(d_out), diag, dtype, seed)


@under_interpreter
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R", [8, 16, 64, 128])
def test_popularity_dtypes_ranks(gpu, popularity, dtype, R):
    V, U, sigma, cluster = layer(dtype, R)
    rows = token_rows(popularity, 8, [1, 5, 1, 17, 1, 1, 9, 2], 10, 0.25, 0)
    run_case(gpu, rows, 10, cluster, V, U, sigma, dtype)


@under_interpreter
@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("R", [8, 512])
def test_diag_and_largest_rank_wide_input(gpu, diag, R):
    V, U, sigma, cluster = layer(torch.float32, R, diag=diag, d_in=2049 if R == 8 else 70, d_out=(40, 24, 24))
    rows = token_rows("zipf", 6, [1, 20, 1, 3, 1, 1], 10, 0.2, 1)
    run_case(gpu, rows, 10, cluster, V, U, sigma, torch.float32)


@under_interpreter
@pytest.mark.parametrize("C", [1, 25])
def test_one_and_many_clusters_padded_rows_strided_y(gpu, C):
    N = 60
    V, U, sigma, cluster = layer(torch.bfloat16, 16, C=C, N=N, d_out=(48, 16, 16))
    rows = token_rows("uniform", 40, [1] * 36 + [9, 2, 33, 1], N, 0.1, 2)
    run_case(gpu, rows, N, cluster, V, U, sigma, torch.bfloat16, pad=13, y_stride_extra=24)


@under_interpreter
@pytest.mark.parametrize("popularity", ["distinct", "zipf"])
def test_real_step_size(gpu, popularity):
    """max_num_seqs 256: one 2,048-token prefill and 255 decodes, 8 clusters of 128 adapters."""
    N = 1024
    V, U, sigma, cluster = random_layer(2, 8, N, 16, 64, [32, 16], False, torch.float16, 3)
    cluster = np.append(np.arange(N) * 8 // N, 0)
    rows = token_rows(popularity, 256, [2048] + [1] * 255, N, 0.1, 3)
    run_case(gpu, rows, N, cluster, V, U, sigma, torch.float16, pad=5)


@under_interpreter
def test_only_tokens_without_adapter_and_empty_step(gpu):
    V, U, sigma, cluster = layer(torch.float32, 16)
    run_case(gpu, np.full(7, 10), 10, cluster, V, U, sigma, torch.float32)
    run_case(gpu, np.zeros(0, dtype=np.int64), 10, cluster, V, U, sigma, torch.float32, pad=3)


@under_interpreter
def test_shape_and_dtype_errors(gpu):
    V, U, sigma, cluster = layer(torch.float32, 16)
    w = JDLayerWeights.from_bases(V, U, sigma)
    tiles = TileBuffers(8, 8, "cpu")
    x, y = torch.randn(8, 123), torch.randn(8, 88)
    with pytest.raises(ValueError, match="x is torch.bfloat16"):
        gpu.jd_lora_gpu(x.bfloat16(), y, w, tiles)
    with pytest.raises(ValueError, match="does not match V_all"):
        gpu.jd_lora_gpu(x[:, :100], y, w, tiles)
    with pytest.raises(ValueError, match="y has shape"):
        gpu.jd_lora_gpu(x, y[:, :80], w, tiles)
    tiles.write(build_tiles(np.zeros(8, dtype=np.int64), cluster, 10), num_rows=9)
    with pytest.raises(ValueError, match="mapping covers 9 tokens but x has 8 rows"):
        gpu.jd_lora_gpu(x, y, w, tiles)


@under_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_selfcheck_passes_and_catches_a_wrong_kernel(dtype, monkeypatch):
    assert selfcheck.check_layer(96, [64, 32, 32], 16, 3, dtype, device="cpu") is None
    real = selfcheck.build_tiles

    def wrong_cluster(rows, cluster_of_row, none_row):  # every tile reads the next cluster's bases
        tiles = real(rows, cluster_of_row, none_row)
        tiles.cluster_tiles[:, 2] = (tiles.cluster_tiles[:, 2] + 1) % 3
        return tiles

    monkeypatch.setattr(selfcheck, "build_tiles", wrong_cluster)
    why = selfcheck.check_layer(96, [64, 32, 32], 16, 3, dtype, device="cpu")
    assert why is not None and "differ from the float32 twin" in why and "rank 16, 3 clusters" in why


def test_config_split_k_and_limits():
    small = config.choose(64, 12, 4096, 3, 16, 2)
    assert small.split_k > 1 and small.k_per_split % small.shrink_k == 0
    assert (small.split_k - 1) * small.k_per_split < 4096 <= small.split_k * small.k_per_split  # no empty split
    assert config.choose(8192, 520, 4096, 3, 16, 2).split_k == 1
    assert config.choose(1, 1, 70, 1, 512, 4).split_k <= 3
    with pytest.raises(ValueError, match="rank 513 is outside"):
        config.choose(64, 12, 4096, 3, 513, 2)
    with pytest.raises(ValueError, match="5 output slices"):
        config.choose(64, 12, 4096, 5, 16, 2)
