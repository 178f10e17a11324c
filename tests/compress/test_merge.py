"""Compress-then-Merge (`vllm-jd merge`): the math (Theorems 4.1/4.3, β, rank), the rules, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tree_digest
from safetensors.torch import load_file

from vllm_jd.cli import main
from vllm_jd.compress.ctm import core_space, fit_subspace, merge_module, objective, reweight, to_core
from vllm_jd.compress.export import reconstruct
from vllm_jd.compress.factors import ModuleFactors
from vllm_jd.compress.jd_full import jd_full
from vllm_jd.compress.merge import merge
from vllm_jd.compress.merge_rules import dare_ties, task_arithmetic, ties, trim
from vllm_jd.compress.synthetic import llama_modules, make_adapters, write_adapter
from vllm_jd.store.format import TensorReader, read_manifest

MODULES = llama_modules(layers=1, hidden=48, kv_dim=24)  # q 48→48, k/v 48→24


def run(*args) -> int:
    return main(["-q", *map(str, args)])


def random_updates(seed: int, T=4, r=3, d_in=40, d_out=32, shared: int | None = None, noise=0.05) -> ModuleFactors:
    """T rank-r updates in float64; ``shared``: B_t, A_t mostly in a common rank-``shared`` subspace."""
    g = torch.Generator().manual_seed(seed)
    if shared is None:
        return ModuleFactors(torch.randn(T, r, d_in, generator=g, dtype=torch.float64),
                             torch.randn(T, r, d_out, generator=g, dtype=torch.float64))
    U0 = torch.randn(d_out, shared, generator=g, dtype=torch.float64)
    V0 = torch.randn(d_in, shared, generator=g, dtype=torch.float64)
    Bt = torch.randn(T, r, shared, generator=g, dtype=torch.float64) @ U0.T
    A = torch.randn(T, r, shared, generator=g, dtype=torch.float64) @ V0.T
    Bt = Bt + noise * torch.randn(T, r, d_out, generator=g, dtype=torch.float64) * Bt.std()
    A = A + noise * torch.randn(T, r, d_in, generator=g, dtype=torch.float64) * A.std()
    return ModuleFactors(A, Bt)


def dense(f: ModuleFactors) -> torch.Tensor:
    """Every P_t densely: [T, d_out, d_in]."""
    return f.Bt.transpose(1, 2) @ f.A


def chordal(Q1: torch.Tensor, Q2: torch.Tensor) -> float:
    """‖sin Θ‖_F between the column spaces of two orthonormal [d, r] matrices (paper App. D.2),
    as ‖(I − Q1 Q1ᵀ) Q2‖_F: the textbook sqrt(r − ‖Q1ᵀQ2‖²) cannot go below sqrt(r·eps) ≈ 3e-8
    in float64 (CI saw 2.98e-8 for equal subspaces), this form goes down to ~1e-15."""
    return float((Q2 - Q1 @ (Q1.T @ Q2)).norm())


# ---------------------------------------------------------------- core math


@pytest.mark.parametrize("rule", ["task-arithmetic", "ties", "dare-ties"])
@pytest.mark.parametrize("space", ["core", "full"])
def test_merged_rank_is_at_most_r(rule, space):
    f = random_updates(0, T=5, r=4)
    m = merge_module(f, 6, rule, space=space)
    assert torch.linalg.matrix_rank(m.delta()) <= 6
    A, B = m.lora()
    assert A.shape == (6, 40) and B.shape == (32, 6)
    assert torch.allclose(m.U.T @ m.U, torch.eye(6, dtype=m.U.dtype), atol=1e-10)
    assert torch.allclose(m.V.T @ m.V, torch.eye(6, dtype=m.V.dtype), atol=1e-10)
    assert torch.linalg.matrix_rank(dense(f).sum(0)) == 20  # the plain sum would need rank 20


@pytest.mark.parametrize("space", ["core", "full"])
def test_task_arithmetic_at_full_rank_is_the_plain_sum(space):
    f = random_updates(1, T=4, r=3)  # T·r_in = 12
    m = merge_module(f, 12, "task-arithmetic", beta=0.25, space=space)
    want = dense(f).sum(0)
    assert float((m.delta() - want).norm() / want.norm()) < 1e-5
    assert min(m.retention) > 1 - 1e-6
    assert m.subspace.lossless == (space == "core")


def test_zero_update_takes_part_but_has_no_retention():
    f = random_updates(5, T=3, r=2)
    f = f.scaled(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))  # e.g. a ComPEFT code that kept nothing
    m = merge_module(f, 4, "task-arithmetic")
    assert m.subspace.lossless and math.isnan(m.retention[1]) and min(m.retention[0], m.retention[2]) > 1 - 1e-9
    want = dense(f).sum(0)
    assert float((m.delta() - want).norm() / want.norm()) < 1e-9
    with pytest.raises(ValueError, match="zero"):
        merge_module(f.scaled(torch.zeros(3, dtype=torch.float64)), 4, "ties")


def test_core_space_is_lossless():
    f = random_updates(2, T=4, r=3)
    U_B, V_A = core_space(f)
    assert U_B.shape == (32, 12) and V_A.shape == (40, 12)
    P = dense(f)
    proj = U_B @ U_B.T @ P @ V_A @ V_A.T
    assert float(((proj - P).flatten(1).norm(dim=1) / P.flatten(1).norm(dim=1)).max()) < 1e-12
    M = dense(to_core(f, U_B, V_A))  # M_t = U_Bᵀ P_t V_A, [T, 12, 12]
    assert torch.allclose(M.flatten(1).norm(dim=1), P.flatten(1).norm(dim=1), rtol=1e-12)
    # adapters that share one rank-2 basis (like one store cluster) have a 2-dimensional core space
    g = torch.Generator().manual_seed(0)
    U0, V0 = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64)
    shared = ModuleFactors(torch.randn(5, 3, 2, generator=g, dtype=torch.float64) @ V0.T,
                           torch.randn(5, 3, 2, generator=g, dtype=torch.float64) @ U0.T)
    U_B, V_A = core_space(shared)
    assert U_B.shape[1] == 2 and V_A.shape[1] == 2
    P = dense(shared)
    assert torch.allclose(U_B @ U_B.T @ P @ V_A @ V_A.T, P, atol=1e-12 * float(P.abs().max()))


def test_beta_one_is_jd_full_and_beta_zero_equalises_norms():
    f = random_updates(3, T=5, r=3, shared=4)
    f = f.scaled(torch.tensor([1.0, 5.0, 0.3, 2.0, 1.0], dtype=torch.float64))
    # β = 1: the targets are the updates themselves, and CtM's basis is JD-Full's
    targets, norms = reweight(f, 1.0)
    assert torch.allclose(dense(targets), dense(f))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    sub = fit_subspace(f, 4, beta=1.0, space="full", iters=30, tol=None, generator=g1)
    ref = jd_full(f, 4, iters=30, generator=g2)
    assert objective(f, sub.U, sub.V) == pytest.approx(ref.losses[-1], rel=1e-8)
    assert chordal(sub.U, ref.U) < 1e-8 and chordal(sub.V, ref.V) < 1e-8
    # the core-space solver (exact HOSVD start) reaches the same objective
    core = fit_subspace(f, 4, beta=1.0, space="core", iters=300, tol=1e-12)
    assert core.space == "core"
    assert objective(f, core.U, core.V) == pytest.approx(ref.losses[-1], rel=1e-6)
    # β = 0: every target has the mean norm
    targets, norms = reweight(f, 0.0)
    assert torch.allclose(targets.norms(), norms.mean().expand(5), rtol=1e-12)
    assert norms.max() / norms.min() > 10  # …although the updates' norms differ a lot
    # and β matters: equalised targets protect the small adapter's retention
    small = [merge_module(f, 4, "task-arithmetic", beta=b, space="core").retention[2] for b in (0.0, 1.0)]
    assert small[0] > small[1]


def test_core_and_full_space_give_the_same_subspace():
    f = random_updates(4, T=4, r=4, d_in=48, d_out=40, shared=5)
    core = fit_subspace(f, 5, beta=0.25, space="core", iters=500, tol=1e-12)
    full = fit_subspace(f, 5, beta=0.25, space="full", iters=500, tol=1e-12)
    assert core.space == "core" and full.space == "full" and core.core_dims == (16, 16)
    assert chordal(core.U, full.U) < 1e-6 and chordal(core.V, full.V) < 1e-6
    targets, _ = reweight(f, 0.25)
    assert objective(targets, core.U, core.V) == pytest.approx(objective(targets, full.U, full.V), rel=1e-9)
    # same subspace and the same canonical basis: the coordinates agree too (Theorem 4.3)
    a, b = merge_module(f, 5, "ties", space="core", iters=500, tol=1e-12), \
        merge_module(f, 5, "ties", space="full", iters=500, tol=1e-12)
    assert torch.allclose(a.delta(), b.delta(), atol=1e-6 * float(a.delta().abs().max()))


# ---------------------------------------------------------------- merge rules


def _naive_ties(O: torch.Tensor, topk: float) -> torch.Tensor:
    """Entry-by-entry TIES, written as plainly as possible (the reference for ``ties``)."""
    T, a, b = O.shape
    k = max(1, math.ceil(topk / 100 * a * b))
    kept = torch.zeros_like(O)
    for t in range(T):
        thresh = sorted(O[t].abs().flatten().tolist(), reverse=True)[k - 1]
        kept[t] = torch.where(O[t].abs() >= thresh, O[t], 0.0)
    signs = torch.sign(kept.sum(0))
    majority = torch.sign(signs.sum())
    out = torch.zeros(a, b, dtype=O.dtype)
    for i in range(a):
        for j in range(b):
            s = signs[i, j] if signs[i, j] != 0 else majority
            vals = [float(kept[t, i, j]) for t in range(T) if kept[t, i, j] * s > 0]
            out[i, j] = sum(vals) / len(vals) if vals else 0.0
    return out


def test_ties_by_hand():
    O = torch.tensor([[[3.0, -1.0], [0.5, 2.0]],
                      [[-1.5, -2.0], [0.2, 1.0]],
                      [[2.0, 1.0], [-4.0, 0.1]]])
    # top 50% per task: {3, 2}, {−2, −1.5}, {−4, 2}; signs + − − +; disjoint means:
    assert torch.equal(trim(O, 50)[1], torch.tensor([[-1.5, -2.0], [0.0, 0.0]]))
    assert torch.allclose(ties(O, 50), torch.tensor([[2.5, -2.0], [-4.0, 2.0]]))
    assert torch.allclose(task_arithmetic(O), O.sum(0))
    # an exact tie (+1, −1) takes the majority sign (+); an entry every task trimmed away is 0
    O2 = torch.tensor([[[1.0, 1.0], [1.0, 2.0]], [[-1.0, 1.0], [1.0, -1.0]]])
    assert torch.allclose(ties(O2, 100), torch.tensor([[1.0, 1.0], [1.0, 2.0]]))
    O3 = torch.tensor([[[5.0, 0.1], [0.0, 0.0]], [[-4.0, -0.1], [0.0, 0.0]], [[3.0, 0.0], [0.0, 0.0]]])
    assert torch.allclose(ties(O3, 25), torch.tensor([[4.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("topk", [10, 25, 50, 100])
def test_ties_matches_naive_reference(topk):
    O = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(topk), dtype=torch.float64)
    assert torch.allclose(ties(O, topk), _naive_ties(O, topk))


def test_dare_ties():
    O = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dare_ties(O, 40, 0.0, torch.Generator().manual_seed(1)), ties(O, 40))
    a = dare_ties(O, 40, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, dare_ties(O, 40, 0.5, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, dare_ties(O, 40, 0.5, torch.Generator().manual_seed(2)))
    # one task, keep all: survivors are rescaled by 1/(1−p), the rest dropped, at rate ≈ p
    big = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(3))
    out = dare_ties(big, 100, 0.3, torch.Generator().manual_seed(4))
    kept = out != 0
    assert torch.allclose(out[kept], big[0][kept] / 0.7)
    assert abs(1 - kept.float().mean() - 0.3) < 0.03
    for bad in (lambda: ties(O, 0), lambda: ties(O, 101), lambda: dare_ties(O, 20, 1.0)):
        with pytest.raises(ValueError):
            bad()


# ---------------------------------------------------------------- store → CLI → PEFT


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """6 rank-4 adapters in 2 planted groups plus one with only q_proj, compressed at rank 4."""
    root = tmp_path_factory.mktemp("merge")
    src = root / "src"
    make_adapters(src, 6, MODULES, rank=4, structure="planted:2", seed=3, alpha=8)
    q = "model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(5)
    write_adapter(src / "partial", {q: (torch.randn(2, 48, generator=g) / 7, torch.randn(48, 2, generator=g))},
                  rank=2, alpha=2)
    out = root / "store"
    assert run("compress", src, "--out", out, "--rank", 4, "--clusters", 2) == 0
    return out


def _cluster_of(store: Path, name: str) -> tuple[int, list[str]]:
    m = read_manifest(store)
    c = m.adapters[name].cluster
    return c, sorted(n for n, a in m.adapters.items() if a.cluster == c)


def _merged_delta(folder: Path, module: str) -> torch.Tensor:
    t = load_file(str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    r = cfg["rank_pattern"].get(module, cfg["r"])
    scale = cfg["alpha_pattern"].get(module, cfg["lora_alpha"]) / r
    a, b = t[f"base_model.model.{module}.lora_A.weight"], t[f"base_model.model.{module}.lora_B.weight"]
    return scale * b.double() @ a.double()


def test_cli_merge_cluster_task_arithmetic_is_exact(store, tmp_path, capsys):
    from peft import LoraConfig

    c, names = _cluster_of(store, "adapter-0000")
    out = tmp_path / "merged"
    assert run("merge", store, "--cluster", c, "--rule", "task-arithmetic", "--out", out) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"merged {len(names)} adapters × 3 modules → {out}: rule task-arithmetic, rank 4")
    cfg = LoraConfig.from_pretrained(str(out))
    assert cfg.r == 4 and cfg.lora_alpha == 4 and cfg.peft_type == "LORA"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 6
    reader = TensorReader(store, read_manifest(store))
    recon = {n: reconstruct(reader, n) for n in names}
    for module, (d_in, d_out) in MODULES.items():
        assert tensors[f"base_model.model.{module}.lora_A.weight"].shape == (4, d_in)
        assert tensors[f"base_model.model.{module}.lora_B.weight"].shape == (d_out, 4)
        # one cluster at the store's rank: its core space is span(U_c), so the sum is exact
        want = sum(b.double() @ a.double() for n in names if module in recon[n] for a, b in [recon[n][module]])
        got = _merged_delta(out, module)
        assert float((got - want).norm() / want.norm()) < 1e-5, module
    info = json.loads((out / "merge.json").read_text())
    assert info["rule"] == "task-arithmetic" and info["beta"] == 0.25 and info["rank"] == 4
    assert info["sources"] == names and info["mean_retention"] > 1 - 1e-5 and info["modules_lossless"] == 3


def test_cli_merge_across_clusters_ties(store, tmp_path, capsys):
    c0, names0 = _cluster_of(store, "adapter-0000")
    c1, names1 = _cluster_of(store, "adapter-0001")
    assert c0 != c1
    picked = [names0[0], names0[1], names1[0], "partial"]
    out = tmp_path / "ties"
    assert run("merge", store, "--adapters", *picked, "--rule", "ties", "--rank", 3, "--scale", 0.75,
               "--out", out) == 0
    assert "rule ties, rank 3" in capsys.readouterr().out
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for module in MODULES:
        assert tensors[f"base_model.model.{module}.lora_A.weight"].shape[0] == 3
        assert torch.linalg.matrix_rank(_merged_delta(out, module)) <= 3
    info = json.loads((out / "merge.json").read_text())
    assert info["sources"] == picked and info["scale"] == 0.75 and 0 < info["mean_retention"] < 1
    # "partial" only has q_proj: it takes part there and nowhere else (paper App. D.6)
    r = merge(store, names=picked, rule="ties", rank=3)
    assert r.modules["model.layers.0.self_attn.q_proj"].adapters == picked
    assert r.modules["model.layers.0.self_attn.k_proj"].adapters == picked[:3]
    assert all(m.subspace.space == "core" for m in r.modules.values())


def test_cluster_and_adapters_selection_agree(store, tmp_path):
    c, names = _cluster_of(store, "adapter-0001")
    a, b = tmp_path / "by-cluster", tmp_path / "by-names"
    assert run("merge", store, "--cluster", c, "--rule", "dare-ties", "--seed", 3, "--out", a) == 0
    assert run("merge", store, "--adapters", *names, "--rule", "dare-ties", "--seed", 3, "--out", b) == 0
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("bad", [
    ["--adapters", "adapter-0000", "no-such-adapter", "--rule", "ties"],
    ["--adapters", "adapter-0000", "--cluster", "0", "--rule", "ties"],
    ["--rule", "ties"],
    ["--cluster", "9", "--rule", "ties"],
    ["--cluster", "0", "--rule", "ties", "--beta", "2"],
    ["--cluster", "0", "--rule", "ties", "--topk", "0"],
    ["--cluster", "0", "--rule", "dare-ties", "--drop", "1"],
    ["--cluster", "0", "--rule", "ties", "--scale", "nan"],
    ["--cluster", "0", "--rule", "ties", "--rank", "0"],
    ["--cluster", "0", "--rule", "ties", "--rank", "25"],  # k/v are 48→24
])
def test_bad_input_exits_2_and_writes_nothing(store, tmp_path, bad, capsys):
    before = tree_digest(store)
    out = tmp_path / "out"
    assert run("merge", store, *bad, "--out", out) == 2
    assert "vllm-jd merge: error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] and tree_digest(store) == before


def test_refuses_non_empty_out(store, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run("merge", store, "--cluster", 0, "--rule", "ties", "--out", out) == 2
    assert "refusing" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("merge", store, "--cluster", 0, "--rule", "ties", "--out", empty) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "merge.json"]
