"""A step's tile lists for the GPU kernels, built on the host once per step for every layer.

Adapter tokens are sorted by (cluster, Σ row), stable, into ``order``; tokens without an adapter
are left out, so no kernel reads or writes them. Two tile lists index ``order``:

- cluster tiles: up to ``TILE_M`` consecutive tokens of *one cluster*: the shrink and expand
  read their cluster's V_c / U_c once per tile, whatever adapters the tokens use;
- Σ tiles: up to ``TILE_M`` consecutive tokens of *one Σ row*: a prefill's tokens share one Σ
  read per tile, a decode token reads its own Σ once.

Static bounds (``max_cluster_tiles``, ``max_sigma_tiles``) depend only on the rows of x and the
layer's shapes, so a CUDA graph launches the same grids every replay; programs past the step's
tile count exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE_M = 16
"""Tokens per tile (``tl.dot``'s smallest M). Decode steps of 64–256 tokens over 8 clusters put
8–32 tokens in a cluster, so larger tiles would mostly be padding."""


def max_cluster_tiles(num_rows: int, num_clusters: int) -> int:
    """Upper bound of cluster tiles for ``num_rows`` tokens: Σ_c ⌈n_c/TILE_M⌉ ≤ ⌈T/TILE_M⌉ + min(C, T)."""
    return -(-num_rows // TILE_M) + min(num_clusters, num_rows)


def max_sigma_tiles(num_rows: int, max_rows_per_step: int) -> int:
    """Upper bound of Σ tiles for ``num_rows`` tokens using at most ``max_rows_per_step`` distinct Σ rows."""
    return -(-num_rows // TILE_M) + min(max_rows_per_step, num_rows)


@dataclass
class StepTiles:
    """int32 arrays: order [n] (adapter tokens by cluster then Σ row); cluster_tiles [n_c, 3]
    (start into order, length, cluster); sigma_tiles [n_s, 3] (start, length, Σ row)."""

    order: np.ndarray
    cluster_tiles: np.ndarray
    sigma_tiles: np.ndarray

    @property
    def num_adapter_tokens(self) -> int:
        return int(self.order.shape[0])


def _cut(keys: np.ndarray) -> np.ndarray:
    """Start and length of tiles over ``keys`` [n] (sorted): runs of equal keys cut every TILE_M → [2, k]."""
    n = keys.shape[0]
    if n == 0:
        return np.zeros((2, 0), dtype=np.int64)
    change = np.ones(n, dtype=bool)
    change[1:] = keys[1:] != keys[:-1]
    run_start = np.flatnonzero(change)
    pos = np.arange(n) - run_start[np.cumsum(change) - 1]
    starts = np.flatnonzero(change | (pos % TILE_M == 0))
    return np.stack([starts, np.diff(np.append(starts, n))])


def build_tiles(rows: np.ndarray, cluster_of_row: np.ndarray, none_row: int) -> StepTiles:
    """Tiles for tokens whose Σ rows are ``rows`` [T] (``none_row`` = no adapter); cluster_of_row
    [N+1] gives each row's basis block (its cluster, or its slot under a residency budget)."""
    rows = np.asarray(rows, dtype=np.int64)
    cluster_of_row = np.asarray(cluster_of_row, dtype=np.int64)
    keep = np.flatnonzero(rows != none_row)
    clusters = cluster_of_row[rows[keep]]
    order = keep[np.lexsort((rows[keep], clusters))]  # by cluster, then row; stable within
    sorted_clusters, sorted_rows = cluster_of_row[rows[order]], rows[order]
    ct = _cut(sorted_clusters)
    st = _cut(sorted_rows)
    as32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)  # noqa: E731
    return StepTiles(as32(order), as32(np.concatenate([ct, sorted_clusters[ct[0]][None]]).T),
                     as32(np.concatenate([st, sorted_rows[st[0]][None]]).T))
