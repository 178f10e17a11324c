"""The step's tile lists in static device buffers, shared by every layer of the step.

CUDA graphs replay with the pointers they captured, so the lists are written *into* the same
buffers each step (a pinned host copy, then one asynchronous copy per list), never reallocated.
On a CPU device (tests under ``TRITON_INTERPRET=1``) the same class writes plain tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_jd.kernels.gpu.tiles import StepTiles, max_cluster_tiles, max_sigma_tiles


class TileBuffers:
    """order [max_tokens]; cluster_tiles / sigma_tiles [capacity, 3] (start, length, key); counts
    [2] (cluster tiles, Σ tiles) — all int32 on ``device``. ``max_rows``: the most distinct Σ rows
    a step may use (vLLM's ``max_num_seqs``), which bounds the Σ tiles' grid."""

    def __init__(self, max_tokens: int, max_rows: int, device: torch.device | str = "cuda"):
        self.device = torch.device(device)
        self.max_tokens, self.max_rows = max_tokens, max_rows
        self.num_rows = 0
        cap = max(max_cluster_tiles(max_tokens, max_tokens), max_sigma_tiles(max_tokens, max_rows), 1)
        pinned = self.device.type == "cuda"
        host = lambda *shape: torch.zeros(*shape, dtype=torch.int32, pin_memory=pinned)  # noqa: E731
        self._host = (host(max(max_tokens, 1)), host(cap, 3), host(cap, 3), host(2))
        self.order, self.cluster_tiles, self.sigma_tiles, self.counts = (t.to(self.device) for t in self._host)
        self._copied = torch.cuda.Event() if pinned else None  # the pinned buffers are reused

    def write(self, tiles: StepTiles, num_rows: int | None = None) -> None:
        """Make the buffers hold ``tiles``: contiguous prefixes of pinned buffers, so the copies are
    truly asynchronous (queued on the current stream). ``num_rows``: the step's token count
    (default: the highest mapped token + 1), which x must not fall short of."""
        if num_rows is None:
            num_rows = int(tiles.order.max()) + 1 if len(tiles.order) else 0
        self.num_rows = num_rows
        n, nc, ns = tiles.num_adapter_tokens, tiles.cluster_tiles.shape[0], tiles.sigma_tiles.shape[0]
        if n > self.max_tokens:
            raise ValueError(f"{n} adapter tokens in one step, more than the {self.max_tokens} the buffers hold")
        keys = tiles.sigma_tiles[:, 2]  # sorted (by cluster, then row): a row's tiles are contiguous
        distinct = int(np.count_nonzero(keys[1:] != keys[:-1])) + 1 if len(keys) else 0
        if distinct > self.max_rows:
            raise ValueError(f"{distinct} distinct adapters in one step, more than max_rows={self.max_rows}")
        if self._copied is not None:
            self._copied.synchronize()  # normally long done: the previous step's copies
        order, ctiles, stiles, counts = self._host
        order[:n] = torch.from_numpy(tiles.order)
        ctiles[:nc] = torch.from_numpy(tiles.cluster_tiles)
        stiles[:ns] = torch.from_numpy(tiles.sigma_tiles)
        counts[0], counts[1] = nc, ns
        blocking = self._copied is None
        self.order[:n].copy_(order[:n], non_blocking=not blocking)
        self.cluster_tiles[:nc].copy_(ctiles[:nc], non_blocking=not blocking)
        self.sigma_tiles[:ns].copy_(stiles[:ns], non_blocking=not blocking)
        self.counts.copy_(counts, non_blocking=not blocking)
        if self._copied is not None:
            self._copied.record()
