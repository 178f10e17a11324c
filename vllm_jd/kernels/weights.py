"""A layer's shared-basis weights, in the layouts the CPU and GPU kernels read.

``JDLayerWeights`` holds the bases of every cluster and every adapter's Σ for one (possibly
packed) layer; the kernels' own layouts derived from them are declared fields made on first use
and kept current through ``refresh_slot`` (one cluster block rewritten) and ``reset_caches``
(tensors replaced), so no other module writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_jd.kernels import amx, jd_fused_cpu


@dataclass
class JDLayerWeights:
    """One layer's weights laid out for the CPU path (and read by the Triton kernels).

    V_all: [d_in, C·S·R], column (c·S + s)·R + r = V[s, c][:, r] (shrink over all clusters in one
    GEMM; ``V_all[:, c·S·R:(c+1)·S·R]`` is cluster c's block); UT: S tensors [C·R, d_s], row
    c·R + r = U[s, c][:, r]; sigma: [N+1, S, R, R] or [N+1, S, R], in the weights' dtype. A full
    Σ is stored transposed (``sigma.transpose(-1, -2)`` is contiguous): the CPU decode path and
    the fused kernel then read each Σᵀ as one contiguous block (2.6× faster than the standard
    layout, docs/measurements.md); every reader goes through strides, so any layout gives the
    same result.
    """

    V_all: torch.Tensor
    UT: list[torch.Tensor]
    sigma: torch.Tensor
    num_clusters: int
    rank: int
    # derived layouts, each made on first use by its method below and kept current by
    # ``refresh_slot`` / ``reset_caches`` (False: the kernel cannot run this layer here)
    _v_grid: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _amx: amx.AMXBases | bool | None = field(default=None, init=False, repr=False, compare=False)
    _fused: jd_fused_cpu.FusedBases | bool | None = field(default=None, init=False, repr=False, compare=False)
    _ut_cat: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_bases(cls, V: torch.Tensor, U: list[torch.Tensor], sigma: torch.Tensor) -> JDLayerWeights:
        """V [S, C, d_in, R], U list of [C, d_s, R], sigma [S, N+1, R(, R)] → this layout."""
        S, C, d_in, R = V.shape
        V_all = V.permute(2, 1, 0, 3).reshape(d_in, C * S * R).contiguous()
        UT = [u.permute(0, 2, 1).reshape(C * R, u.shape[1]).contiguous() for u in U]
        sigma = sigma.transpose(0, 1).to(V.dtype)
        if sigma.dim() == 4:
            sigma = sigma.transpose(-1, -2).contiguous().transpose(-1, -2)
        return cls(V_all, UT, sigma.contiguous() if sigma.dim() == 3 else sigma, C, R)

    def amx_bases(self) -> amx.AMXBases | None:
        """The bases packed for AMX (``amx.AMXBases``, made once), or None where ``amx.usable`` says
        no (no AMX, fp32, a CUDA tensor, an N not a multiple of 32)."""
        if self._amx is None:
            d_in = self.V_all.shape[0]
            S, R = len(self.UT), self.rank
            ok = (self.V_all.device.type == "cpu" and self.num_clusters > 1
                  and amx.usable(self.V_all.dtype, [S * R] + [u.shape[1] for u in self.UT], [d_in, R]))
            self._amx = amx.AMXBases(self.V_all, self.UT, self.num_clusters, R) if ok else False
        return self._amx or None

    def fused_bases(self, isa: str | None = None) -> jd_fused_cpu.FusedBases | None:
        """The bases laid out for the fused CPU kernel (``jd_fused_cpu.FusedBases``, made once), or
        None where ``jd_fused_cpu.usable`` says no (no kernel here, not bf16, a CUDA tensor, sizes).
        ``isa``: for that variant instead of this process's (benchmarks; replaces the cached one)."""
        if self._fused is None or (isa is not None and (not self._fused or self._fused.isa != isa)):
            isa = isa or jd_fused_cpu.kernel_isa()
            ok = (self.V_all.device.type == "cpu"
                  and jd_fused_cpu.usable(self.V_all.dtype, self.V_all.shape[0], self.rank, [u.shape[1] for u in self.UT], isa))
            self._fused = jd_fused_cpu.FusedBases(self.V_all, self.UT, self.num_clusters, self.rank, isa) if ok else False
        return self._fused or None

    def expand_bases(self) -> torch.Tensor:
        """UT of all slices side by side: [C·R, Σ d_s], row c·R + r, slice s's columns = U[s, c][:, r]
        (the GPU expand's layout: one launch for all slices). Made once; on CUDA the UT list then
        holds views of it, so the bases are not stored twice and writes into UT land in it."""
        cat = self._ut_cat
        if cat is None:
            cat = self._ut_cat = torch.cat(self.UT, 1)
            if cat.is_cuda:
                bounds = torch.tensor([0] + [u.shape[1] for u in self.UT]).cumsum(0).tolist()
                self.UT = [cat[:, a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        return cat

    def _expand_bases_current(self) -> bool:
        """True when ``expand_bases()`` is a CUDA tensor the UT list still views (so still valid)."""
        cat = self._ut_cat
        return (cat is not None and cat.is_cuda
                and all(u.untyped_storage().data_ptr() == cat.untyped_storage().data_ptr() for u in self.UT))

    def refresh_slot(self, slot: int) -> None:
        """Bring the derived layouts of cluster block ``slot`` up to date after V_all / UT changed there."""
        if self._v_grid is not None:
            width = self.V_all.shape[1] // self.num_clusters
            self._v_grid[slot].copy_(self.V_all[:, slot * width:(slot + 1) * width])
        for derived in (self._amx, self._fused):
            if derived:
                derived.refresh(self.V_all, self.UT, slot)
        if not self._expand_bases_current():
            self._ut_cat = None  # a CPU copy, or UT replaced: made again now on CUDA (never inside a capture)
            if self.V_all.is_cuda:
                self.expand_bases()

    def reset_caches(self, rebuild: bool = False) -> None:
        """Forget the derived layouts (``V_grid``, ``amx_bases``, ``fused_bases``, ``expand_bases``)
        after V_all / UT were replaced; ``rebuild`` makes the kernels' ones (and ``V_grid`` where
        there was one) again now. On CUDA the expand layout is made at once (never inside a graph
        capture), and kept while UT still views it: captured graphs hold its pointer."""
        had_grid = self._v_grid is not None
        self._v_grid = None
        self._amx = None
        self._fused = None
        if not self._expand_bases_current():
            self._ut_cat = None
            if self.V_all.is_cuda:
                self.expand_bases()
        if rebuild:
            self.amx_bases()
            self.fused_bases()
            if had_grid:
                self.V_grid()

    def V_grid(self) -> torch.Tensor:
        """V per cluster for all slices: [C, d_in, S·R] (made once, cached)."""
        if self._v_grid is None:
            d_in = self.V_all.shape[0]
            self._v_grid = self.V_all.view(d_in, self.num_clusters, -1).permute(1, 0, 2).contiguous()
        return self._v_grid
