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


@dataclass
class JDMeta:
    """token_row/token_cluster [T] long; seg_row [G] long; seg_index [G, L] long (T = padding);
    token_flat [T] long: position of token t in the flattened [G·L] segment layout."""

    token_row: torch.Tensor
    token_cluster: torch.Tensor
    seg_row: torch.Tensor
    seg_index: torch.Tensor
    token_flat: torch.Tensor
    any_adapter: bool
    """False when no token has an adapter: layers skip the LoRA branch entirely."""

    @property
    def num_tokens(self) -> int:
        return int(self.token_row.shape[0])


def build_meta(rows: np.ndarray, cluster_of_row: np.ndarray, none_row: int, device: torch.device | str = "cpu",
               chunk: int = SEGMENT_CHUNK) -> JDMeta:
    """Metadata for tokens whose Σ rows are ``rows`` [T] (``none_row`` = no adapter).

    cluster_of_row: [N+1] cluster id of every row.
    """
    rows = np.asarray(rows, dtype=np.int64)
    T = rows.shape[0]
    if T == 0:
        starts = np.zeros(0, dtype=np.int64)
    else:
        change = np.ones(T, dtype=bool)
        change[1:] = rows[1:] != rows[:-1]
        run_start = np.flatnonzero(change)
        run_id = np.cumsum(change) - 1
        pos_in_run = np.arange(T) - run_start[run_id]
        starts = np.flatnonzero(change | (pos_in_run % chunk == 0))
    lengths = np.diff(np.append(starts, T))
    L = int(lengths.max()) if T else 1
    seg_index = starts[:, None] + np.arange(L)[None, :]
    seg_index = np.where(np.arange(L)[None, :] < lengths[:, None], seg_index, T)
    seg_of_token = np.repeat(np.arange(len(starts)), lengths)
    token_flat = seg_of_token * L + (np.arange(T) - starts[seg_of_token]) if T else np.zeros(0, dtype=np.int64)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)  # noqa: E731
    return JDMeta(token_row=as_t(rows), token_cluster=as_t(cluster_of_row[rows]), seg_row=as_t(rows[starts]),
                  seg_index=as_t(seg_index), token_flat=as_t(token_flat), any_adapter=bool((rows != none_row).any()))
