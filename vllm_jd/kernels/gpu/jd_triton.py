"""Triton kernels of the GPU path: shrink per cluster tile, Σ per adapter tile, expand per
cluster tile. ``jd_lora_gpu`` runs the three: ``y[t, slice s] += U[s, c(t)] Σ[s, a(t)] V[s, c(t)]ᵀ x[t]``.

Shapes: x [T, d_in]; y [T, Σ d_s] (any strides); V_all [d_in, C·S·R] (column (c·S + s)·R + r =
V[s, c][:, r]); ``JDLayerWeights.expand_bases()`` [C·R, Σ d_s] (row c·R + r, slice s's columns =
U[s, c][:, r]); Σ [N+1, S, R, R] or [N+1, S, R]. Intermediates: h [split_k, T, S·R] and g
[T, S·R], float32, indexed by token, so only adapter tokens' rows are written or read.

Precision: bf16/fp16 operands go to ``tl.dot`` natively with fp32 accumulation; fp32 models use
``input_precision="ieee"`` so fp32 parity means the same on a GPU as here. Σ always runs in fp32
(R×R per tile: negligible work). Triton 3.9's interpreter computes bf16 × bf16 ``tl.dot`` wrongly
(errors ~1e10), so under ``TRITON_INTERPRET=1`` bf16 operands are widened to fp32 first: bf16
products are exact in fp32, so this is the same arithmetic up to summation order.

Graph safety: grids depend only on x's row count and the layer's shapes (``tiles.max_*``);
programs past the step's tile counts (read from device memory) return at once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vllm_jd.kernels.gpu import config
from vllm_jd.kernels.gpu.buffers import TileBuffers
from vllm_jd.kernels.gpu.tiles import TILE_M
from vllm_jd.kernels.weights import JDLayerWeights


@triton.jit
def _tile(order_ptr, tiles_ptr, tile, T, BLOCK_M: tl.constexpr):
    """Tile ``tile`` of an [n, 3] tile list: its key (cluster or Σ row), token ids and mask."""
    start = tl.load(tiles_ptr + 3 * tile)
    length = tl.load(tiles_ptr + 3 * tile + 1)
    key = tl.load(tiles_ptr + 3 * tile + 2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    tok = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    return key, tok, mask_m & (tok < T)  # padded x rows beyond T are never mapped; guard anyway


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _shrink_kernel(x_ptr, v_ptr, h_ptr, order_ptr, ctiles_ptr, counts_ptr,
                   T, d_in, SR, k_per_split,
                   stride_xt, stride_xk, stride_vk, stride_hsplit, stride_ht,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):
    """h[split, t, n] = Σ_{k in split} x[t, k] V_all[k, c·S·R + n] for the tokens of one cluster tile."""
    tile, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if tile >= tl.load(counts_ptr):
        return
    c, tok, mask_m = _tile(order_ptr, ctiles_ptr, tile, T, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < SR
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, d_in), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d_in
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        v = tl.load(v_ptr + offs_k[:, None].to(tl.int64) * stride_vk + (c * SR + offs_n)[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += _dot(xt, v, FP32_DOT)
    tl.store(h_ptr + split * stride_hsplit + tok[:, None] * stride_ht + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _sigma_kernel(h_ptr, sigma_ptr, g_ptr, order_ptr, stiles_ptr, counts_ptr,
                  T, R, SR, split_k, stride_hsplit, stride_ht,
                  stride_sig_row, stride_sig_s, stride_sig_q, stride_sig_r, stride_gt,
                  DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """g[t, s·R + q] = Σ_r Σ[a, s, q, r] h[t, s·R + r] (h summed over splits) for one Σ tile (row a)."""
    tile, s, pid_q = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if tile >= tl.load(counts_ptr + 1):
        return
    row, tok, mask_m = _tile(order_ptr, stiles_ptr, tile, T, BLOCK_M)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < R
    sig = sigma_ptr + row * stride_sig_row + s * stride_sig_s
    h_rows = h_ptr + tok[:, None] * stride_ht + s * R
    if DIAG:
        h = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
        for sp in range(0, split_k):
            h += tl.load(h_rows + sp * stride_hsplit + offs_q[None, :], mask=mask_m[:, None] & mask_q[None, :],
                         other=0.0)
        g = h * tl.load(sig + offs_q * stride_sig_r, mask=mask_q, other=0.0).to(tl.float32)[None, :]
    else:
        g = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for sp in range(0, split_k):
                h += tl.load(h_rows + sp * stride_hsplit + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                             other=0.0)
            sig_t = tl.load(sig + offs_r[:, None] * stride_sig_r + offs_q[None, :] * stride_sig_q,
                            mask=mask_r[:, None] & mask_q[None, :], other=0.0).to(tl.float32)  # Σᵀ [r, q]
            g += tl.dot(h, sig_t, input_precision="ieee")
    tl.store(g_ptr + tok[:, None] * stride_gt + (s * R + offs_q)[None, :], g, mask=mask_m[:, None] & mask_q[None, :])


@triton.jit
def _slice_of_block(pid_n, d0, d1, d2, d3, BLOCK_N: tl.constexpr):
    """Column block ``pid_n`` of the expand → (slice, its first column in y, local block, width)."""
    b0 = tl.cdiv(d0, BLOCK_N)
    b1 = b0 + tl.cdiv(d1, BLOCK_N)
    b2 = b1 + tl.cdiv(d2, BLOCK_N)
    s = (pid_n >= b0).to(tl.int32) + (pid_n >= b1).to(tl.int32) + (pid_n >= b2).to(tl.int32)
    first_block = tl.where(s == 0, 0, tl.where(s == 1, b0, tl.where(s == 2, b1, b2)))
    offset = tl.where(s == 0, 0, tl.where(s == 1, d0, tl.where(s == 2, d0 + d1, d0 + d1 + d2)))
    width = tl.where(s == 0, d0, tl.where(s == 1, d1, tl.where(s == 2, d2, d3)))
    return s, offset, pid_n - first_block, width


@triton.jit
def _expand_kernel(g_ptr, u_ptr, y_ptr, order_ptr, ctiles_ptr, counts_ptr,
                   T, R, d0, d1, d2, d3, stride_gt, stride_ur, stride_yt, stride_yn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, FP32_DOT: tl.constexpr):
    """y[t, off_s + n] += Σ_r g[t, s·R + r] U[s, c][n, r] for one cluster tile and column block."""
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    if tile >= tl.load(counts_ptr):
        return
    c, tok, mask_m = _tile(order_ptr, ctiles_ptr, tile, T, BLOCK_M)
    s, offset, local, width = _slice_of_block(pid_n, d0, d1, d2, d3, BLOCK_N)
    offs_n = local * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        g = tl.load(g_ptr + tok[:, None] * stride_gt + (s * R + offs_r)[None, :],
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        u = tl.load(u_ptr + (c * R + offs_r)[:, None] * stride_ur + (offset + offs_n)[None, :],
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc += _dot(g.to(u.dtype), u, FP32_DOT)
    y_ptrs = y_ptr + tok[:, None] * stride_yt + (offset + offs_n)[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(x: torch.Tensor, y: torch.Tensor, w: JDLayerWeights, widths: list[int], tiles: TileBuffers) -> None:
    S, C, R = len(w.UT), w.num_clusters, w.rank
    if x.dim() != 2 or w.V_all.shape != (x.shape[1], C * S * R):
        raise ValueError(f"x {tuple(x.shape)} does not match V_all {tuple(w.V_all.shape)} (d_in, C·S·R = {C}·{S}·{R})")
    if x.dtype != w.V_all.dtype or y.dtype != w.V_all.dtype:
        raise ValueError(f"x is {x.dtype} and y {y.dtype} but the weights are {w.V_all.dtype}")
    if y.shape != (x.shape[0], sum(widths)):
        raise ValueError(f"y has shape {tuple(y.shape)}, expected {(x.shape[0], sum(widths))}")
    if w.V_all.stride(1) != 1 or w.expand_bases().stride(1) != 1:  # the kernels step columns by 1
        raise ValueError("V_all and expand_bases() must have contiguous rows")
    if tiles.num_rows > x.shape[0]:  # the grids are sized for x's rows: more mapped tokens would go unserved
        raise ValueError(f"the step's mapping covers {tiles.num_rows} tokens but x has {x.shape[0]} rows")


def jd_lora_gpu(x: torch.Tensor, y: torch.Tensor, w: JDLayerWeights, tiles: TileBuffers) -> None:
    """In place ``y += U Σ Vᵀ x`` per adapter token (same semantics as ``jd_lora_torch``); tokens
    without an adapter keep y exactly. ``tiles`` holds the step's tile lists (``TileBuffers.write``).
    ValueError on a shape or dtype mismatch."""
    widths = [u.shape[1] for u in w.UT]
    _check(x, y, w, widths, tiles)
    T, d_in = x.shape
    S, C, R = len(widths), w.num_clusters, w.rank
    if T == 0:
        return
    fp32_dot = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _interpreted())
    launch = config.launches(T, C, tiles.max_rows, d_in, widths, R, x.element_size())
    cfg = launch.cfg
    u = w.expand_bases()
    sigma = w.sigma
    diag = sigma.dim() == 3
    h = torch.empty(cfg.split_k, T, S * R, dtype=torch.float32, device=x.device)
    g = torch.empty(T, S * R, dtype=torch.float32, device=x.device)
    ct, st, order, counts = tiles.cluster_tiles, tiles.sigma_tiles, tiles.order, tiles.counts
    _shrink_kernel[launch.shrink](
        x, w.V_all, h, order, ct, counts, T, d_in, S * R, cfg.k_per_split,
        x.stride(0), x.stride(1), w.V_all.stride(0), h.stride(0), h.stride(1),
        BLOCK_M=TILE_M, BLOCK_N=cfg.shrink_n, BLOCK_K=cfg.shrink_k, FP32_DOT=fp32_dot)
    _sigma_kernel[launch.sigma](
        h, sigma, g, order, st, counts, T, R, S * R, cfg.split_k, h.stride(0), h.stride(1),
        sigma.stride(0), sigma.stride(1), 0 if diag else sigma.stride(2), sigma.stride(-1), g.stride(0),
        DIAG=diag, BLOCK_M=TILE_M, BLOCK_Q=cfg.sigma_q, BLOCK_R=cfg.sigma_r)
    d = widths + [0] * (config.MAX_SLICES - S)
    _expand_kernel[launch.expand](
        g, u, y, order, ct, counts, T, R, *d, g.stride(0), u.stride(0), y.stride(0), y.stride(1),
        BLOCK_M=TILE_M, BLOCK_N=cfg.expand_n, BLOCK_R=cfg.expand_r, FP32_DOT=fp32_dot)

