"""Per-process serving state: the current step's metadata, written by the manager once per step
and read by every layer through the registered op (``serving/op.py``)."""

from __future__ import annotations

import numpy as np
import torch

from vllm_jd.kernels.gpu.buffers import TileBuffers
from vllm_jd.kernels.gpu.tiles import build_tiles
from vllm_jd.kernels.metadata import JDMeta, build_meta


class JDState:
    """Token → (Σ row, cluster) metadata of the current step.

    On CUDA the step's tile lists live in static buffers written in place (``TileBuffers``), so
    CUDA graphs and compiled graphs replay with the current step's data; on CPU each step builds
    new tensors.
    """

    def __init__(self, cluster_of_row: np.ndarray, none_row: int, device: torch.device | str = "cpu",
                 max_tokens: int = 8192, max_segs: int = 257):
        self.cluster_of_row = np.asarray(cluster_of_row, dtype=np.int64)
        self.none_row = none_row
        self.device = torch.device(device)
        self.meta: JDMeta | None = None
        self.tiles = TileBuffers(max_tokens, max_segs, self.device) if self.device.type == "cuda" else None

    def set_clusters(self, cluster_of_row: np.ndarray) -> None:
        """The row → basis block table after adapters were added or the store was switched (the
        next step's tiles use it)."""
        self.cluster_of_row = np.asarray(cluster_of_row, dtype=np.int64)

    def update(self, rows: np.ndarray, lora_active: bool = True) -> JDMeta:
        """Set the metadata for tokens whose Σ rows are ``rows`` [T] (``none_row`` = no adapter);
        ``lora_active``: some token has a LoRA id (``JDMeta.lora_active``)."""
        if self.tiles is None:
            self.meta = build_meta(rows, self.cluster_of_row, self.none_row, self.device)
            return self.meta
        tiles = build_tiles(rows, self.cluster_of_row, self.none_row)
        self.tiles.write(tiles, num_rows=len(rows))
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.meta = JDMeta(token_row=empty, token_cluster=empty, seg_row=empty, seg_index=empty, token_flat=empty,
                           any_adapter=tiles.num_adapter_tokens > 0, lora_active=lora_active, tiles=self.tiles,
                           none_row=self.none_row)
        return self.meta
