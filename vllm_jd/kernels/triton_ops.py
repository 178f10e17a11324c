"""Triton kernels for the GPU: ``jd_shrink_sigma`` (shrink with Σ fused) and ``jd_expand``.

Tokens are grouped by adapter (Σ row), as punica's SGMV groups them by LoRA: every program of
column ``seg`` serves one adapter, so after the shrink ``h = x V_c`` of its token tile it applies
that adapter's Σ with one more ``tl.dot`` (``g = h Σᵀ``) before writing, and the R×R Σ is read
once per tile, not once per token. ``jd_expand`` adds ``g U_cᵀ`` to the output rows in place.

Graph safety: the grid is (⌈T/BLOCK_M⌉, slices, max_segs) with T = the rows of x, and every
program reads its segment's length from device memory and exits early, so nothing depends on
host values that change between steps; the metadata tensors are written before the step.
Tokens with no adapter belong to no segment and are never read or written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_jd.kernels.metadata import JDMeta
from vllm_jd.kernels.torch_ops import JDLayerWeights


@triton.jit
def _segment_tile(sorted_tokens_ptr, row_start_ptr, row_id_ptr, cluster_of_row_ptr, seg, pid_m, n_tok, R,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Tile ``pid_m`` of adapter segment ``seg``: its Σ row, cluster, token ids and masks."""
    start = tl.load(row_start_ptr + seg)
    row = tl.load(row_id_ptr + seg)
    c = tl.load(cluster_of_row_ptr + row)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_tok
    tok = tl.load(sorted_tokens_ptr + start + offs_m, mask=mask_m, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    return row, c, tok, mask_m, offs_r, offs_r < R


@triton.jit
def _jd_shrink_sigma_kernel(
    x_ptr,  # [T, d_in] activations
    v_ptr,  # V_all [d_in, C*S*R]: column (c*S + s)*R + r holds V[s, c][:, r]
    sigma_ptr,  # [N+1, S, R, R] (full) or [N+1, S, R] (diag), any strides
    g_ptr,  # out: [S, T, R] float32
    sorted_tokens_ptr, row_start_ptr, row_len_ptr, row_id_ptr,  # adapter segments (metadata.py)
    cluster_of_row_ptr,  # [N+1] cluster of each Σ row
    d_in, S, R,
    stride_xt, stride_xk, stride_vk,
    stride_sig_row, stride_sig_s, stride_sig_q, stride_sig_r,
    stride_gs, stride_gt,
    DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    seg = tl.program_id(2)
    n_tok = tl.load(row_len_ptr + seg)
    if pid_m * BLOCK_M >= n_tok:
        return
    row, c, tok, mask_m, offs_r, mask_r = _segment_tile(
        sorted_tokens_ptr, row_start_ptr, row_id_ptr, cluster_of_row_ptr, seg, pid_m, n_tok, R, BLOCK_M, BLOCK_R)
    col = (c * S + s) * R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d_in
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        v = tl.load(v_ptr + offs_k[:, None] * stride_vk + col + offs_r[None, :],
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        # fp32 operands (TF32 tensor cores on H100): the shrink is memory-bound at R ≤ 128, and
        # Triton 3.9's interpreter computes bf16 × bf16 tl.dot wrongly (errors ~1e10 measured),
        # so one code path is what the CPU tests check and what the GPU runs
        acc += tl.dot(xt.to(tl.float32), v.to(tl.float32))
    sig = sigma_ptr + row * stride_sig_row + s * stride_sig_s
    if DIAG:
        sd = tl.load(sig + offs_r * stride_sig_r, mask=mask_r, other=0.0).to(tl.float32)
        g = acc * sd[None, :]
    else:
        # g[m, q] = Σ_r h[m, r] Σ[q, r]: load Σᵀ as [r, q]
        sig_t = tl.load(sig + offs_r[None, :] * stride_sig_q + offs_r[:, None] * stride_sig_r,
                        mask=mask_r[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        g = tl.dot(acc, sig_t, input_precision="ieee")
    tl.store(g_ptr + s * stride_gs + tok[:, None] * stride_gt + offs_r[None, :], g,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _jd_expand_kernel(
    g_ptr,  # [S, T, R] float32 from _jd_shrink_sigma_kernel
    ut_ptr,  # UT[s] [C*R, d_s]: row c*R + r holds U[s, c][:, r]
    y_ptr,  # [T, sum(d_s)] output, updated in place
    sorted_tokens_ptr, row_start_ptr, row_len_ptr, row_id_ptr, cluster_of_row_ptr,
    s, d_s, y_offset, R,
    stride_gs, stride_gt, stride_ut, stride_yt, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2)
    n_tok = tl.load(row_len_ptr + seg)
    if pid_m * BLOCK_M >= n_tok:
        return
    row, c, tok, mask_m, offs_r, mask_r = _segment_tile(
        sorted_tokens_ptr, row_start_ptr, row_id_ptr, cluster_of_row_ptr, seg, pid_m, n_tok, R, BLOCK_M, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_s
    gt = tl.load(g_ptr + s * stride_gs + tok[:, None] * stride_gt + offs_r[None, :],
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    u = tl.load(ut_ptr + (c * R + offs_r)[:, None] * stride_ut + offs_n[None, :],
                mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    out = tl.dot(gt, u)
    y_ptrs = y_ptr + tok[:, None] * stride_yt + (y_offset + offs_n)[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + out).to(y.dtype), mask=mask)


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))  # tl.dot needs every dim ≥ 16


def jd_shrink_sigma(x: torch.Tensor, w: JDLayerWeights, segs: tuple[torch.Tensor, ...], cluster_of_row: torch.Tensor,
                    block_m: int = 16, block_k: int = 64) -> torch.Tensor:
    """``g[s, t] = Σ[s, a(t)] V[s, c(t)]ᵀ x[t]`` for adapter tokens: returns g [S, T, R] float32.

    x: [T, d_in] (fp32/bf16/fp16, same dtype as ``w.V_all``); segs = (sorted_tokens [T'],
    row_start, row_len, row_id [max_segs]) from ``metadata.adapter_segments``; cluster_of_row
    [N+1]. Rows of tokens without an adapter are left zero. ValueError on a shape/dtype mismatch.
    """
    T, d_in = x.shape
    S, C, R = len(w.UT), w.num_clusters, w.rank
    if w.V_all.shape != (d_in, S * C * R):
        raise ValueError(f"V_all has shape {tuple(w.V_all.shape)}, expected {(d_in, S * C * R)}")
    if x.dtype != w.V_all.dtype:
        raise ValueError(f"x is {x.dtype} but the weights are {w.V_all.dtype}")
    sigma = w.sigma  # [N+1, S, R, R] or [N+1, S, R]
    diag = sigma.dim() == 3
    g = torch.zeros(S, T, R, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(max(T, 1), block_m), S, segs[2].shape[0])
    _jd_shrink_sigma_kernel[grid](
        x, w.V_all, sigma, g, *segs, cluster_of_row,
        d_in, S, R, x.stride(0), x.stride(1), w.V_all.stride(0),
        sigma.stride(0), sigma.stride(1), 0 if diag else sigma.stride(2), sigma.stride(-1), g.stride(0), g.stride(1),
        DIAG=diag, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(R))
    return g


def jd_expand(g: torch.Tensor, w: JDLayerWeights, y: torch.Tensor, segs: tuple[torch.Tensor, ...],
              cluster_of_row: torch.Tensor, block_m: int = 16, block_n: int = 64) -> None:
    """In place ``y[t, slice s] += U[s, c(t)] g[s, t]`` for adapter tokens; g [S, T, R] float32."""
    T = y.shape[0]
    R = w.rank
    off = 0
    for s, ut in enumerate(w.UT):
        d_s = ut.shape[1]
        grid = (triton.cdiv(max(T, 1), block_m), triton.cdiv(d_s, block_n), segs[2].shape[0])
        _jd_expand_kernel[grid](
            g, ut, y, *segs, cluster_of_row,
            s, d_s, off, R, g.stride(0), g.stride(1), ut.stride(0), y.stride(0), y.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(R))
        off += d_s
    if off != y.shape[1]:
        raise ValueError(f"slices cover {off} output columns but y has {y.shape[1]}")


@torch.library.custom_op("vllm_jd::jd_lora", mutates_args=("y",))
def jd_lora_op(x: torch.Tensor, y: torch.Tensor, v_all: torch.Tensor, ut: list[torch.Tensor], sigma: torch.Tensor,
               sorted_tokens: torch.Tensor, row_start: torch.Tensor, row_len: torch.Tensor, row_id: torch.Tensor,
               cluster_of_row: torch.Tensor, num_clusters: int, rank: int) -> None:
    """The registered op (opaque to torch.compile): in place ``y += U Σ Vᵀ x`` per adapter token."""
    w = JDLayerWeights(v_all, list(ut), sigma, num_clusters, rank)
    segs = (sorted_tokens, row_start, row_len, row_id)
    jd_expand(jd_shrink_sigma(x, w, segs, cluster_of_row), w, y, segs, cluster_of_row)


@jd_lora_op.register_fake
def _jd_lora_fake(x, y, v_all, ut, sigma, sorted_tokens, row_start, row_len, row_id, cluster_of_row, num_clusters,
                  rank) -> None:
    return None


def jd_lora_triton(x: torch.Tensor, y: torch.Tensor, w: JDLayerWeights, meta: JDMeta) -> None:
    """In place ``y += U Σ Vᵀ x`` per token with the Triton kernels (same semantics as jd_lora_torch).

    ``meta`` must carry adapter segments (``metadata.with_segments``).
    """
    if meta.sorted_tokens is None or meta.cluster_of_row is None:
        raise ValueError("meta has no adapter segments: build it with metadata.with_segments")
    jd_lora_op(x, y, w.V_all, w.UT, w.sigma, meta.sorted_tokens, meta.row_start, meta.row_len, meta.row_id,
               meta.cluster_of_row, w.num_clusters, w.rank)
