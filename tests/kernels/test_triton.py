"""Triton kernels under TRITON_INTERPRET=1 (no GPU here) against the float32 reference twins.

Small odd shapes (d_in 123 and 2049, slices 40/24/24), fp32/bf16/fp16, ranks 8–128, the four
popularity cases, and tokens without an adapter mixed in (their output must stay exact).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cases import POPULARITY, TOL, random_layer, token_rows

from vllm_jd.kernels.metadata import adapter_segments, build_meta, with_segments
from vllm_jd.kernels.reference import jd_lora_ref, jd_shrink_ref, jd_sigma_ref
from vllm_jd.kernels.torch_ops import JDLayerWeights


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
under_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run by test_kernels_under_triton_interpreter in a "
                                                                 "child process with TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETED, reason="this is the parent")
def test_kernels_under_triton_interpreter():
    """Triton fixes interpreter mode when it is imported (its standard library is decorated then),
    and this process imported it long ago; so the kernel tests run in a child process."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.fixture(scope="module")
def triton_ops():
    return importlib.import_module("vllm_jd.kernels.triton_ops")


def setup(popularity, dtype, R, C=3, diag=False, d_in=123, d_out=(40, 24, 24), N=10, seed=0,
          seq_lens=(1, 5, 1, 17, 1, 1, 9, 2)):
    V, U, sigma, cluster = random_layer(len(d_out), C, N, R, d_in, list(d_out), diag, dtype, seed)
    rows = token_rows(popularity, len(seq_lens), list(seq_lens), N, 0.25, seed)
    meta = with_segments(build_meta(rows, cluster, N), cluster, N, max_segs=16)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(len(rows), d_in, generator=g).to(dtype)
    y = torch.randn(len(rows), sum(d_out), generator=g).to(dtype)
    return V, U, sigma, rows, meta, x, y, JDLayerWeights.from_bases(V, U, sigma)


@under_interpreter
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R", [8, 16, 64, 128])
def test_jd_lora_triton(triton_ops, popularity, dtype, R):
    V, U, sigma, rows, meta, x, y, w = setup(popularity, dtype, R)
    want = jd_lora_ref(x, y, V, U, sigma, meta.token_cluster, meta.token_row)
    got = y.clone()
    triton_ops.jd_lora_triton(x, got, w, meta)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    assert torch.equal(got[rows == 10], y[rows == 10])  # tokens without an adapter: untouched


@under_interpreter
@pytest.mark.parametrize("diag", [False, True])
def test_shrink_sigma_fused(triton_ops, diag):
    V, U, sigma, rows, meta, x, y, w = setup("zipf", torch.float32, 16, diag=diag, d_in=2049)
    segs = (meta.sorted_tokens, meta.row_start, meta.row_len, meta.row_id)
    g = triton_ops.jd_shrink_sigma(x, w, segs, meta.cluster_of_row)  # [S, T, R]
    want = jd_sigma_ref(jd_shrink_ref(x, V, meta.token_cluster), sigma, meta.token_row)  # [T, S, R]
    torch.testing.assert_close(g.transpose(0, 1), want, atol=2e-4, rtol=2e-4)


@under_interpreter
def test_registered_op_and_single_cluster(triton_ops):
    V, U, sigma, rows, meta, x, y, w = setup("uniform", torch.float32, 32, C=1)
    want = jd_lora_ref(x, y, V, U, sigma, meta.token_cluster, meta.token_row)
    got = y.clone()
    torch.ops.vllm_jd.jd_lora(x, got, w.V_all, w.UT, w.sigma, meta.sorted_tokens, meta.row_start, meta.row_len,
                              meta.row_id, meta.cluster_of_row, w.num_clusters, w.rank)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@under_interpreter
def test_no_adapter_tokens_only(triton_ops):
    V, U, sigma, rows, meta, x, y, w = setup("uniform", torch.float32, 16, seq_lens=(3, 4))
    meta = with_segments(build_meta(np.full(7, 10), np.zeros(11, dtype=np.int64), 10), np.zeros(11, dtype=np.int64),
                         10, max_segs=4)
    got = y.clone()
    triton_ops.jd_lora_triton(x, got, w, meta)
    assert torch.equal(got, y)


def test_adapter_segments():
    order, start, length, row = adapter_segments(np.array([4, 9, 2, 4, 9, 9]), none_row=9, max_segs=4)
    assert row.tolist() == [2, 4, 0, 0] and length.tolist() == [1, 2, 0, 0]
    assert order[start[1] : start[1] + 2].tolist() == [0, 3]
    with pytest.raises(ValueError, match="more than max_segs=1"):
        adapter_segments(np.array([1, 2]), none_row=9, max_segs=1)


@under_interpreter
def test_shape_and_dtype_errors(triton_ops):
    V, U, sigma, rows, meta, x, y, w = setup("uniform", torch.float32, 16)
    segs = (meta.sorted_tokens, meta.row_start, meta.row_len, meta.row_id)
    with pytest.raises(ValueError, match="x is torch.bfloat16"):
        triton_ops.jd_shrink_sigma(x.bfloat16(), w, segs, meta.cluster_of_row)
    with pytest.raises(ValueError, match="V_all has shape"):
        triton_ops.jd_shrink_sigma(x[:, :100].contiguous(), w, segs, meta.cluster_of_row)
