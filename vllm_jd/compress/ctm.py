"""Compress-then-Merge (CtM, He et al. 2026), per module: T LoRA updates → ONE rank-r update.

The store-level command (selection, reading, PEFT output) is ``merge``.

Per module, with the T adapters that have it (an adapter without the module is left out of that
module's merge, paper App. D.6), ΔW^(t) = B_t A_t (B_t [d_out, r_t], A_t [r_t, d_in]):

1. **Reweighted targets** (eqs. 3–4), used only to learn the basis:
   ``ΔW_target^(t) = λ_t ΔW^(t)/‖ΔW^(t)‖_F``, ``λ_t = β‖ΔW^(t)‖_F + (1−β)·mean_s‖ΔW^(s)‖_F``.
   β = 1 keeps the updates (large-norm adapters dominate); β = 0 gives all equal norm.
2. **Shared subspace** (eq. 2 / Tucker-2, eq. 8):
   ``min_{UᵀU=I, VᵀV=I, C_t} Σ_t ‖ΔW_target^(t) − U C_t Vᵀ‖²_F`` with U [d_out, r], V [d_in, r].
   This is exactly JD-Full's objective (``jd_full.py``, P_t = ΔW_target^(t)), so JD-Full's
   solver is used: its Gauss–Seidel subspace iteration is HOOI with one power step per half-step
   and never increases the objective.
3. **Coordinates of the ORIGINAL updates** (eq. 5): ``O^(t) = Uᵀ ΔW^(t) V`` [r, r], computed as
   ``(Uᵀ B_t)(A_t V)`` from the factors (no d×d matrix).
4. **Merge** (eq. 6): ``O_merged = 𝓜({O^(t)})`` with a rule of ``merge_rules``.
5. **Lift** (eq. 7): ``ΔW_merged = α · U O_merged Vᵀ``, rank ≤ r by construction.

**Core space** (eqs. 9–12, Theorems 4.1–4.3). With U_B [d_out, k] an orthonormal basis of the
columns of B_cat = [B_1 … B_T] and V_A [d_in, k'] one of the rows of A_cat = [A_1; …; A_T]:
``ΔW^(t) = U_B U_Bᵀ ΔW^(t) V_A V_Aᵀ`` exactly (4.1), some optimum has Col(U) ⊆ Col(U_B) and
Col(V) ⊆ Col(V_A) (4.2), so the problem is solved on ``M^(t) = (U_Bᵀ B_t)(A_t V_A)`` [k, k']
and lifted back, ``U = U_B U_core``, ``V = V_A V_core``, with the same optimum (4.3). ‖M^(t)‖ =
‖ΔW^(t)‖, so the reweighting can be done in either space. It pays off when k ≤ Σ_t r_t is
below min(d_in, d_out); otherwise the solve runs in the full space (still from factors).
k and k' are the numerical ranks, so rank-deficient groups shrink further. Store adapters of
one cluster c all have B_t = U_c Σ_t and A_t = V_cᵀ, so their core space lies in span(U_c),
span(V_c): dimension ≤ r_c however many adapters the cluster has. ``merge`` therefore builds
U_B, V_A from the distinct clusters' bases (dimension Σ_c r_c), not from the T·r_c columns of
B_cat.

If k ≤ r (and k' ≤ r) the core space itself is the basis: lossless, no iteration, and task
arithmetic then reproduces Σ_t ΔW^(t) exactly. A single cluster merged at the store's rank is
exactly ``U_c 𝓜({Σ_t}) V_cᵀ`` up to a rotation.

**Basis convention.** Element-wise rules (TIES, DARE) depend on the basis inside the subspace
(paper App. D.2), and a subspace-iteration solver returns an arbitrary one. The basis is
therefore canonicalised as a Tucker/HOSVD solver would return it: U's columns are the
eigenvectors of Σ_t C_t C_tᵀ (V's of Σ_t C_tᵀ C_t), in decreasing order, C_t the target
coordinates; each column's largest-magnitude entry is made positive (D.2's sign rule). This
leaves the subspace, the objective and task arithmetic unchanged and makes TIES deterministic.

**PEFT export.** ``lora_A = Vᵀ`` [r, d_in], ``lora_B = α U O_merged`` [d_out, r],
``lora_alpha = r`` so PEFT's scale is 1 — the convention of ``export``: the orthonormal
factor goes to A, the magnitudes to B. A module whose core space is smaller than r gets that
smaller rank (PEFT's ``rank_pattern``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

from vllm_jd.compress.factors import ModuleFactors
from vllm_jd.compress.jd_full import jd_full, residuals_full, sigma_full
from vllm_jd.compress.merge_rules import apply_rule

logger = logging.getLogger(__name__)

DEFAULT_BETA = 0.25
"""Paper App. C.2: β is searched in {0, 0.25, 0.5, 0.75}; 0.25 is the vision pick for TIES and
DARE-TIES (Table 5) and the README's example; results are "relatively insensitive" to β in
that range, while β = 1 "consistently degrades performance" (Fig. 4)."""
DEFAULT_TOPK = 25.0
"""TIES top-K% of each task's r² coordinates (Table 5 vision / README example: 25)."""
DEFAULT_DROP = 0.05
"""DARE drop rate p (Table 5 vision: 0.05)."""
DEFAULT_ITERS = 100
"""Subspace iterations; the reference code runs up to 1000 with tol 1e-6, but in the core space
an iteration costs O((T r)³)-ish and converges in far fewer."""
DEFAULT_TOL = 1e-6
RANK_RTOL = 1e-10
"""Singular values below RANK_RTOL · σ_max of B_cat / A_cat are rank deficiency, not signal:
dropping them loses at most that relative energy."""

Space = Literal["auto", "core", "full"]


# --------------------------------------------------------------------------------------------
# Building blocks on one module's factors (ModuleFactors: A [T, r, d_in], Bt [T, r, d_out])
# --------------------------------------------------------------------------------------------


def orth_span(x: torch.Tensor, rtol: float = RANK_RTOL) -> torch.Tensor:
    """Orthonormal basis of the column space of x [d, K] at its numerical rank: [d, k], k ≤ K.

    Thin QR (d·K²) then an SVD of the K×K factor R, which reveals the rank without ever
    squaring the condition number (an eigendecomposition of xᵀx would).
    """
    if x.shape[1] == 0:
        return x
    q, r = torch.linalg.qr(x, mode="reduced")
    w, s, _ = torch.linalg.svd(r)
    k = int((s > rtol * s[0]).sum()) if s[0] > 0 else 0
    return q @ w[:, :k]


def core_space(f: ModuleFactors, rtol: float = RANK_RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_B [d_out, k], V_A [d_in, k']): orthonormal spans of B_cat = [B_1 … B_T] and A_catᵀ.

    Theorem 4.1: ``ΔW^(t) = U_B U_Bᵀ ΔW^(t) V_A V_Aᵀ`` for every t.
    """
    n, r = f.A.shape[:2]
    b_cat = f.Bt.reshape(n * r, -1).T  # [d_out, T·r]: the columns of every B_t
    a_cat = f.A.reshape(n * r, -1).T  # [d_in, T·r]: the rows of every A_t, as columns
    return orth_span(b_cat, rtol), orth_span(a_cat, rtol)


def to_core(f: ModuleFactors, U_B: torch.Tensor, V_A: torch.Tensor) -> ModuleFactors:
    """Factors of ``M^(t) = U_Bᵀ ΔW^(t) V_A`` [k, k']: A_t V_A and B_tᵀ U_B (eq. 10)."""
    bu, av = f.shrink(U_B, V_A)
    return ModuleFactors(av, bu)


def reweight(f: ModuleFactors, beta: float) -> tuple[ModuleFactors, torch.Tensor]:
    """Surrogate targets of eqs. 3–4 and the original norms.

    Returns factors of ``λ_t P_t/‖P_t‖`` with ``λ_t = β‖P_t‖ + (1−β)·mean‖P‖`` (an all-zero
    update stays zero) and ‖P_t‖_F [T] float64.
    """
    norms = f.norms()
    lam = beta * norms + (1 - beta) * norms.mean()
    factor = torch.where(norms > 0, lam / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return f.scaled(factor.to(f.A.device)), norms


def _top_eigvecs(S: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading eigenvectors of symmetric S [d, d], in decreasing eigenvalue order: [d, k]."""
    _, vecs = torch.linalg.eigh(S)
    return vecs.flip(1)[:, :k]


def _grams(f: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_t P_t P_tᵀ`` [d_out, d_out] and ``Σ_t P_tᵀ P_t`` [d_in, d_in] from the factors.

    Only for small d (the core space): P_t P_tᵀ = B_t (A_t A_tᵀ) B_tᵀ.
    """
    ga = f.A @ f.A.transpose(1, 2)  # A_t A_tᵀ  [T, r, r]
    gb = f.Bt @ f.Bt.transpose(1, 2)  # B_tᵀ B_t  [T, r, r]
    su = torch.einsum("tri,trs,tsj->ij", f.Bt, ga, f.Bt)
    sv = torch.einsum("tri,trs,tsj->ij", f.A, gb, f.A)
    return su, sv


def _canonical(f: ModuleFactors, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate U [d_out, a], V [d_in, b] inside their spans to the HOSVD basis of the targets ``f``.

    With C_t = Uᵀ P_t V: U ← U·eigvecs(Σ C_t C_tᵀ), V ← V·eigvecs(Σ C_tᵀ C_t), decreasing order.
    """
    C = sigma_full(f, U, V)  # [T, a, b]
    U = U @ _top_eigvecs((C @ C.transpose(1, 2)).sum(0), U.shape[1])
    V = V @ _top_eigvecs((C.transpose(1, 2) @ C).sum(0), V.shape[1])
    return U, V


def _fix_signs(X: torch.Tensor) -> torch.Tensor:
    """Flip each column of X [d, k] so that its largest-magnitude entry is positive (App. D.2)."""
    idx = X.abs().argmax(0)
    sign = torch.sign(X.gather(0, idx[None]))[0]
    return X * torch.where(sign == 0, torch.ones_like(sign), sign)


@dataclass
class Subspace:
    """The learned basis of one module: U [d_out, r_u], V [d_in, r_v], orthonormal columns."""

    U: torch.Tensor
    V: torch.Tensor
    space: Literal["core", "full"]
    core_dims: tuple[int, int] | None
    """(k, k') = dims of the core space when it was used, else None."""
    iterations: int
    lossless: bool
    """True if the basis spans every update exactly (core space of dimension ≤ r)."""


def fit_subspace(f: ModuleFactors, rank: int, beta: float = DEFAULT_BETA, space: Space = "auto",
                 iters: int = DEFAULT_ITERS, tol: float | None = DEFAULT_TOL,
                 generator: torch.Generator | None = None,
                 span: tuple[torch.Tensor, torch.Tensor] | None = None) -> Subspace:
    """CtM's basis (steps 1–2 above) for the T updates in ``f`` at ``rank``.

    ``space``: "core" (Theorems 4.1–4.3), "full" (JD-Full on the d-dimensional factors), or
    "auto": core iff the core space's dimension bound is below min(d_in, d_out).
    ``span`` = (columns [d_out, K] spanning every B_t, columns [d_in, K'] spanning every A_tᵀ)
    replaces B_cat/A_cat as the source of U_B, V_A (e.g. the store's cluster bases).
    In the core space the solver starts from the exact HOSVD (the reference code's init='svd');
    in the full space from JD-Full's randomised HOSVD seeded by ``generator``.
    Returns U [d_out, r_u], V [d_in, r_v] with r_u, r_v ≤ rank, canonicalised (module docstring).
    """
    if space not in ("auto", "core", "full"):
        raise ValueError(f"space must be auto, core or full, got {space!r}")
    d_out, d_in = f.d_out, f.d_in
    if not 1 <= rank <= min(d_in, d_out):
        raise ValueError(f"rank must be in [1, {min(d_in, d_out)}] (the module's smaller dimension), got {rank}")
    nonzero = torch.nonzero(f.norms() > 0)[:, 0]
    if nonzero.numel() == 0:
        raise ValueError("every update of the module is zero: there is nothing to merge")
    bound = max(span[0].shape[1], span[1].shape[1]) if span is not None else f.n * f.A.shape[1]
    use_core = space == "core" or (space == "auto" and bound < min(d_in, d_out))
    targets, _ = reweight(f, beta)
    generator = generator or torch.Generator().manual_seed(0)

    if not use_core:
        res = jd_full(targets, rank, iters=iters, tol=tol, generator=generator)
        U, V = _canonical(targets, res.U, res.V)
        return Subspace(_fix_signs(U), _fix_signs(V), "full", None, len(res.losses) - 1, False)

    if span is not None:
        U_B, V_A = orth_span(span[0]), orth_span(span[1])
    else:
        # a zero update (B_t = 0 with A_t ≠ 0, or vice versa) must not spend core dimensions
        U_B, V_A = core_space(f.subset(nonzero))
    k_u, k_v = U_B.shape[1], V_A.shape[1]
    if k_u == 0 or k_v == 0:
        raise ValueError("every update of the module is zero: there is nothing to merge")
    core = to_core(targets, U_B, V_A)  # targets of M^(t), [k, k']: reweighting commutes with it
    iterations = 0
    if k_u <= rank and k_v <= rank:  # the core space is the basis: lossless, nothing to solve
        Uc, Vc = torch.eye(k_u, dtype=f.A.dtype), torch.eye(k_v, dtype=f.A.dtype)
    elif k_u <= rank or k_v <= rank:
        # One side is lossless (identity); for it fixed, the other side's optimum is the top
        # eigenvectors of Σ M_t M_tᵀ (or Σ M_tᵀ M_t): exact, no iteration.
        su, sv = _grams(core)
        Uc = torch.eye(k_u, dtype=f.A.dtype) if k_u <= rank else _top_eigvecs(su, rank)
        Vc = torch.eye(k_v, dtype=f.A.dtype) if k_v <= rank else _top_eigvecs(sv, rank)
    else:
        su, sv = _grams(core)
        res = jd_full(core, rank, iters=iters, tol=tol, init=(_top_eigvecs(su, rank), _top_eigvecs(sv, rank)))
        Uc, Vc, iterations = res.U, res.V, len(res.losses) - 1
    Uc, Vc = _canonical(core, Uc, Vc)
    U, V = _fix_signs(U_B @ Uc), _fix_signs(V_A @ Vc)
    return Subspace(U, V, "core", (k_u, k_v), iterations, k_u <= rank and k_v <= rank)


@dataclass
class ModuleMerge:
    """The merge of one module: ``ΔW_merged = scale · U merged Vᵀ``."""

    U: torch.Tensor
    """[d_out, r_u] orthonormal."""
    V: torch.Tensor
    """[d_in, r_v] orthonormal."""
    coords: torch.Tensor
    """O^(t) = Uᵀ ΔW^(t) V of the original updates, [T_m, r_u, r_v]."""
    merged: torch.Tensor
    """O_merged = rule(O), [r_u, r_v] (before ``scale``)."""
    scale: float
    adapters: list[str]
    """The T_m adapters (in order of ``coords``) that have this module."""
    retention: list[float]
    """‖Uᵀ ΔW^(t) V‖_F / ‖ΔW^(t)‖_F per adapter (paper Fig. 3's energy retention; NaN: ΔW^(t) = 0)."""
    subspace: Subspace

    @property
    def rank(self) -> int:
        """Rank of the exported LoRA factors (rows of lora_A)."""
        return self.V.shape[1]

    def lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT factors with scale 1: (lora_A = Vᵀ [r_v, d_in], lora_B = scale·U O_merged [d_out, r_v]), float32."""
        return (self.V.T.to(torch.float32).contiguous(),
                (self.scale * self.U @ self.merged).to(torch.float32).contiguous())

    def delta(self) -> torch.Tensor:
        """Dense ``ΔW_merged`` [d_out, d_in] (for tests and small modules only)."""
        return self.scale * self.U @ self.merged @ self.V.T


def objective(f: ModuleFactors, U: torch.Tensor, V: torch.Tensor) -> float:
    """``Σ_t ‖P_t − U (UᵀP_tV) Vᵀ‖²_F`` (eq. 2 at the optimal C_t), float64, without cancellation."""
    return float(residuals_full(f, U, V).sum())


def merge_module(f: ModuleFactors, rank: int, rule: str, beta: float = DEFAULT_BETA, scale: float = 1.0,
                 topk: float = DEFAULT_TOPK, drop: float = DEFAULT_DROP, generator: torch.Generator | None = None,
                 space: Space = "auto", iters: int = DEFAULT_ITERS, tol: float | None = DEFAULT_TOL,
                 span: tuple[torch.Tensor, torch.Tensor] | None = None, names: list[str] | None = None
                 ) -> ModuleMerge:
    """CtM of the T updates ``P_t = Bt_tᵀ A_t`` in ``f`` (steps 1–5 of the module docstring).

    ``generator`` drives both the full-space initialisation and DARE's drops. Returns the
    basis, the coordinates [T, r_u, r_v], the merged [r_u, r_v] and per-task retention.
    """
    generator = generator or torch.Generator().manual_seed(0)
    sub = fit_subspace(f, rank, beta, space, iters, tol, generator, span)
    coords = sigma_full(f, sub.U, sub.V)  # (Uᵀ B_t)(A_t V) from the ORIGINAL factors (eq. 5)
    merged = apply_rule(rule, coords, topk, drop, generator)
    norms = f.norms()
    kept = coords.double().flatten(1).norm(dim=1)
    # an all-zero update (e.g. a ComPEFT code that kept nothing) has no retention: NaN, left out of means
    retention = torch.where(norms > 0, kept / norms.clamp_min(1e-300), torch.full_like(norms, math.nan))
    return ModuleMerge(sub.U, sub.V, coords, merged, scale, list(names or [str(i) for i in range(f.n)]),
                       [float(x) for x in retention], sub)
