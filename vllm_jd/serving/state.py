"""Per-process serving state: the current step's metadata, written by the manager once per step
and read by every layer through the registered op (``serving/op.py``)."""

from __future__ import annotations

import numpy as np
import torch

from vllm_jd.kernels.metadata import JDMeta, adapter_segments, build_meta


class JDState:
    """Token → (Σ row, cluster) metadata of the current step.

    On CUDA the kernels' segment tensors live in static buffers updated in place (so CUDA graphs
    and compiled graphs replay with the current step's data); on CPU each step builds new tensors.
    """

    def __init__(self, cluster_of_row: np.ndarray, none_row: int, device: torch.device | str = "cpu",
                 max_tokens: int = 8192, max_segs: int = 257):
        self.cluster_of_row = np.asarray(cluster_of_row, dtype=np.int64)
        self.none_row = none_row
        self.device = torch.device(device)
        self.meta: JDMeta | None = None
        if self.device.type == "cuda":
            self._sorted = torch.zeros(max_tokens, dtype=torch.int64, device=self.device)
            self._seg = torch.zeros(3, max_segs, dtype=torch.int64, device=self.device)  # start, len, row
            self._seg_host = torch.zeros(3, max_segs, dtype=torch.int64).pin_memory()
            self._sorted_host = torch.zeros(max_tokens, dtype=torch.int64).pin_memory()
            self._cluster = torch.from_numpy(self.cluster_of_row).to(self.device)
            self._copied = torch.cuda.Event()  # the pinned buffers are reused: wait for the last copy
            self._copied.record()

    def set_clusters(self, cluster_of_row: np.ndarray) -> None:
        """The row → basis block table after adapters were added (same length: spare rows were
        reserved) or the store was switched."""
        self.cluster_of_row = np.asarray(cluster_of_row, dtype=np.int64)
        if self.device.type == "cuda":
            table = torch.from_numpy(self.cluster_of_row)
            if table.shape == self._cluster.shape:
                self._cluster.copy_(table)  # in place: graphs keep the pointer
            else:  # another store version with more rows (eager mode only, see manager.jd_switch_store)
                self._cluster = table.to(self.device)

    def update(self, rows: np.ndarray) -> JDMeta:
        """Set the metadata for tokens whose Σ rows are ``rows`` [T] (``none_row`` = no adapter)."""
        if self.device.type != "cuda":
            self.meta = build_meta(rows, self.cluster_of_row, self.none_row, self.device)
            return self.meta
        sorted_tokens, start, length, row = adapter_segments(rows, self.none_row, self._seg.shape[1])
        T = len(sorted_tokens)
        if T > self._sorted.shape[0]:
            raise ValueError(f"{T} tokens in one step, more than the {self._sorted.shape[0]} the buffers hold")
        self._copied.synchronize()  # normally long done; guards the pinned buffers against a pending DMA
        self._sorted_host[:T] = torch.from_numpy(sorted_tokens)
        self._seg_host[0], self._seg_host[1], self._seg_host[2] = (torch.from_numpy(a) for a in (start, length, row))
        self._sorted.copy_(self._sorted_host, non_blocking=True)
        self._seg.copy_(self._seg_host, non_blocking=True)
        self._copied.record()
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.meta = JDMeta(token_row=empty, token_cluster=empty, seg_row=empty, seg_index=empty, token_flat=empty,
                           any_adapter=True, sorted_tokens=self._sorted, row_start=self._seg[0], row_len=self._seg[1],
                           row_id=self._seg[2], cluster_of_row=self._cluster)
        return self.meta
