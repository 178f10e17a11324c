"""Per-step batch metadata, built once per step on the host and shared by every layer.

vLLM flattens a step's tokens request by request, so a request's tokens are contiguous and
share one Σ row. The CPU path applies Σ per *segment* (a run of tokens with the same row, cut
every ``chunk`` tokens) with one batched matmul, instead of gathering an R×R matrix per token:
a 1,536-token prefill of 64 requests then reads 96 Σ matrices, not 1,536.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SEGMENT_CHUNK = 16
"""Longest segment; bounds the padding of the batched Σ matmul to < 16 rows per segment."""


def bucket(n: int) -> int:
    """``n`` rounded up to one of few sizes: n itself up to 4, then 4 sizes per octave (5, 6, 7,
    8, 10, 12, 14, 16, 20, 24, ...), so at most 25% more; 48 sizes up to 8,192.

    Every GEMM of the CPU path takes its varying dimension (tokens, grid height, segments) from
    here. torch's bf16/fp16 matmul and bmm on CPU go through oneDNN, which JIT-compiles and
    caches a primitive per distinct shape (ideep's and oneDNN's caches, 1,024 entries each, about
    0.5 MB an entry here, more with more threads): with the step's exact sizes a server under
    adapter traffic kept creating primitives and its worker grew by ~1 GB before the caches were
    full, and every new shape paid a JIT compile.
    """
    if n <= 4:
        return n
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def _long_tensor(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)


@dataclass
class GridMeta:
    """Tokens in a padded per-cluster grid [C, L] (stable order within a cluster).

    perm [C·L]: token at each cell (padding reads token 0); inv [T]: cell of each token; seg_row,
    seg_index (grid cells), cell_flat: same-Σ-row segments of the real cells.
    """

    perm: torch.Tensor
    inv: torch.Tensor
    L: int
    num_clusters: int
    seg_row: torch.Tensor
    seg_index: torch.Tensor
    cell_flat: torch.Tensor
    split: SigmaSplit | None = None
    """The same segments split by length, for a full Σ (``SigmaSplit``)."""


@dataclass
class SigmaSplit:
    """A step's same-Σ-row segments split in two: tokens alone in their run (decode tokens) get
    Σ applied one by one with an ``embedding_bag`` (``sigma_bags``); runs of several tokens
    (prefills) share one Σ per segment in a batched matmul. Mixing both in one padded matmul
    pads every decode token's segment to the longest prefill's length.

    single_cells [n1] / single_rows [n1]: grid cells and Σ rows of lone tokens; multi_cells [n2]:
    the other real cells; multi_seg_row [G], multi_seg_index [G, Lg] (cells), multi_flat [n2]:
    ``segments`` of those, as ``_apply_sigma`` takes them.
    """

    single_cells: torch.Tensor
    single_rows: torch.Tensor
    multi_cells: torch.Tensor
    multi_seg_row: torch.Tensor
    multi_seg_index: torch.Tensor
    multi_flat: torch.Tensor
    _bags: dict | None = None

    def bags(self, S: int, R: int) -> torch.Tensor:
        """``sigma_bags`` of the lone tokens for S slices of rank R (once per step and shape)."""
        self._bags = self._bags or {}
        if (S, R) not in self._bags:
            self._bags[(S, R)] = sigma_bags(self.single_rows, S, R)
        return self._bags[(S, R)]


def split_segments(rows: np.ndarray, cells: np.ndarray, device) -> SigmaSplit:
    """``SigmaSplit`` of items with Σ rows ``rows`` [T] sitting in grid cells ``cells`` [T]."""
    T = rows.shape[0]
    change = np.ones(T + 1, dtype=bool)
    change[1:T] = rows[1:] != rows[:-1]
    starts = np.flatnonzero(change)
    run_len = np.diff(starts)
    lone = np.repeat(run_len == 1, run_len)
    single, multi = np.flatnonzero(lone), np.flatnonzero(~lone)
    # dropping lone tokens may join two runs of one row: still one Σ, so still one segment
    seg_row, seg_index, flat = segments(rows[multi])
    as_t = lambda a: _long_tensor(a, device)  # noqa: E731
    return SigmaSplit(as_t(cells[single]), as_t(rows[single]), as_t(cells[multi]), as_t(seg_row),
                      as_t(cells[multi][seg_index] if len(multi) else seg_index), as_t(flat))


@dataclass
class ClusterOrder:
    """The adapter tokens of a step grouped by cluster, for the fused CPU kernel (numpy, read by
    pointer): tok [n] token ids (stable within a cluster; tokens with no adapter left out), row
    [n] their Σ rows, cstart [C+1] where each cluster's tokens start in tok."""

    tok: np.ndarray
    row: np.ndarray
    cstart: np.ndarray
    num_clusters: int


@dataclass
class JDMeta:
    """token_row/token_cluster [T] long; seg_row [G] long; seg_index [G, L] long (padding repeats
    a segment's first token); token_flat [T] long: position of token t in the flattened [G·L]
    segment layout."""

    token_row: torch.Tensor
    token_cluster: torch.Tensor
    seg_row: torch.Tensor
    seg_index: torch.Tensor
    token_flat: torch.Tensor
    any_adapter: bool
    """False when no token has an adapter: layers skip the LoRA branch entirely."""
    lora_active: bool = True
    """Some token is mapped to a LoRA id, maybe vLLM's dummy warm-up adapters (whose rows are the
    "no adapter" row): a CUDA graph captured for such a step must contain the op."""
    tiles: object | None = None
    """GPU kernels: the step's tile lists in device buffers (``kernels.gpu.buffers.TileBuffers``)."""
    none_row: int = -1
    _grid: GridMeta | None = None
    _order: ClusterOrder | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_row.shape[0])

    def cluster_order(self, num_clusters: int) -> ClusterOrder:
        """Adapter tokens grouped by cluster (computed once per step)."""
        if self._order is None or self._order.num_clusters != num_clusters:
            rows = self.token_row.cpu().numpy()
            tc = self.token_cluster.cpu().numpy()
            keep = np.flatnonzero(rows != self.none_row)
            tok = keep[np.argsort(tc[keep], kind="stable")]
            cstart = np.concatenate([[0], np.cumsum(np.bincount(tc[tok], minlength=num_clusters))])
            i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731  (the kernel reads int64 pointers; no copy if so)
            self._order = ClusterOrder(i64(tok), i64(rows[tok]), i64(cstart), num_clusters)
        return self._order

    def cluster_grid(self, num_clusters: int) -> GridMeta:
        """Tokens laid out per cluster in a padded [C, L] grid (computed once per step)."""
        if self._grid is None or self._grid.num_clusters != num_clusters:
            tc = self.token_cluster.cpu().numpy()
            T, C = len(tc), num_clusters
            counts = np.bincount(tc, minlength=C)
            L = bucket(max(int(counts.max()) if T else 1, 1))  # few distinct grid heights (``bucket``)
            order = np.argsort(tc, kind="stable")
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            flat = tc[order] * L + (np.arange(T) - starts[tc[order]])
            perm = np.zeros(C * L, dtype=np.int64)  # pad cells read token 0; their Σ row is the zero row
            perm[flat] = order
            inv = np.empty(T, dtype=np.int64)
            inv[order] = flat
            # segments over the real cells only (grid order); pad cells take any value (cell 0's),
            # since nothing reads them back: at decode every token is then its own segment
            rows = self.token_row.cpu().numpy()[order]
            seg_row, seg_index, real_flat = segments(rows)
            seg_index = flat[seg_index] if T else seg_index
            cell_flat = np.zeros(C * L, dtype=np.int64)
            cell_flat[flat] = real_flat
            as_t = lambda a: _long_tensor(a, self.token_row.device)  # noqa: E731
            split = split_segments(rows, flat, self.token_row.device) if T else None
            self._grid = GridMeta(as_t(perm), as_t(inv), L, C, as_t(seg_row), as_t(seg_index), as_t(cell_flat),
                                  split)
        return self._grid


def sigma_bags(rows: torch.Tensor, S: int, R: int) -> torch.Tensor:
    """Indices [n·S, R] for ``embedding_bag`` over Σᵀ viewed as a [(N+1)·S·R, R] table: bag
    (i, s) sums rows ((rows[i]·S + s)·R + r), r < R, weighted by h[i, s, r], which is
    ``Σ[rows[i], s] h[i, s]``. One fused gather-and-sum, where gathering the Σ matrices and
    multiplying copies each one first (5.6× slower, docs/measurements.md)."""
    base = (rows[:, None] * S + torch.arange(S, device=rows.device))[:, :, None] * R
    return (base + torch.arange(R, device=rows.device)).view(-1, R)


def segments(rows: np.ndarray, chunk: int = SEGMENT_CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal Σ rows in ``rows`` [T], cut every ``chunk`` items.

    Returns seg_row [G], seg_index [G, L] (item index; padding repeats the segment's first item)
    and item_flat [T] (position of item t in the flattened [G·L] layout). G is the segment count
    rounded up by ``bucket`` (extra segments repeat item 0 and its row; nothing reads them back) and
    L the longest segment rounded up to a power of two, so the batched Σ matmuls see few shapes.
    """
    rows = np.asarray(rows, dtype=np.int64)
    T = rows.shape[0]
    if T == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 1), dtype=np.int64), np.zeros(0, dtype=np.int64)
    change = np.ones(T, dtype=bool)
    change[1:] = rows[1:] != rows[:-1]
    run_start = np.flatnonzero(change)
    run_id = np.cumsum(change) - 1
    pos_in_run = np.arange(T) - run_start[run_id]
    starts = np.flatnonzero(change | (pos_in_run % chunk == 0))
    lengths = np.diff(np.append(starts, T))
    longest = int(lengths.max())
    L = min(1 << (longest - 1).bit_length(), max(chunk, longest))
    seg_of_item = np.repeat(np.arange(len(starts)), lengths)
    item_flat = seg_of_item * L + (np.arange(T) - starts[seg_of_item])
    starts = np.concatenate([starts, np.zeros(bucket(len(starts)) - len(starts), dtype=starts.dtype)])
    lengths = np.concatenate([lengths, np.ones(len(starts) - len(lengths), dtype=lengths.dtype)])
    seg_index = starts[:, None] + np.arange(L)[None, :]
    # padding repeats the segment's first item: its result lands in a cell nothing reads back
    seg_index = np.where(np.arange(L)[None, :] < lengths[:, None], seg_index, starts[:, None])
    return rows[starts], seg_index, item_flat


def build_meta(rows: np.ndarray, cluster_of_row: np.ndarray, none_row: int, device: torch.device | str = "cpu",
               chunk: int = SEGMENT_CHUNK) -> JDMeta:
    """Metadata for tokens whose Σ rows are ``rows`` [T] (``none_row`` = no adapter).

    cluster_of_row: [N+1] cluster id of every row.
    """
    rows = np.asarray(rows, dtype=np.int64)
    seg_row, seg_index, token_flat = segments(rows, chunk)
    as_t = lambda a: _long_tensor(a, device)  # noqa: E731
    return JDMeta(token_row=as_t(rows), token_cluster=as_t(np.asarray(cluster_of_row)[rows]), seg_row=as_t(seg_row),
                  seg_index=as_t(seg_index), token_flat=as_t(token_flat), any_adapter=bool((rows != none_row).any()),
                  none_row=none_row)

