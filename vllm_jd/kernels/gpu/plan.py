"""The byte and tile model of one layer call on the GPU: programs launched and working, and the
bytes of bases, Σ and activations each kernel reads or writes. A model, not a measurement:
pure arithmetic over a step's Σ rows, tested on CPU, used to predict H100 cost (``docs/gpu.md``).

Costs are counted as requested by programs (a basis read by two tiles counts twice), so the
time predicted from them is an upper bound where the L2 cache serves repeats.
``plan_call`` models the kernels of ``jd_triton.py``; ``plan_call_per_adapter`` the earlier
kernels, which grouped tokens by adapter, for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vllm_jd.kernels.gpu import config
from vllm_jd.kernels.gpu.tiles import TILE_M, build_tiles

H100_BANDWIDTH = 3.35e12
"""H100 SXM HBM3, bytes/s."""
LAUNCH_FLOOR_S = 4e-6
"""Floor per kernel launch (launch, ramp-up and tail of a small kernel)."""
IDLE_PROGRAM_S = 1e-9
"""Cost of a program that exits at once (an assumption, order of magnitude: ~130 SMs retiring
roughly one empty program per SM every 100 ns)."""


@dataclass(frozen=True)
class LayerShape:
    """One adapted layer: input width, output slice widths, rank, clusters, bytes per weight, Σ diagonal?"""

    d_in: int
    widths: tuple[int, ...]
    rank: int
    clusters: int
    elem_bytes: int = 2
    diag: bool = False


@dataclass
class KernelCost:
    """One launch: programs launched and doing work, bytes read of bases / Σ, bytes of
    activations and intermediates read plus written."""

    name: str
    launched: int
    working: int
    bases_bytes: int
    sigma_bytes: int
    act_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.bases_bytes + self.sigma_bytes + self.act_bytes

    def seconds(self, bandwidth: float = H100_BANDWIDTH) -> float:
        return LAUNCH_FLOOR_S + self.total_bytes / bandwidth + (self.launched - self.working) * IDLE_PROGRAM_S


def plan_call(rows: np.ndarray, cluster_of_row: np.ndarray, none_row: int, shape: LayerShape, max_rows: int,
              num_rows: int | None = None) -> list[KernelCost]:
    """The three launches of ``jd_lora_gpu`` for tokens with Σ rows ``rows`` (x has ``num_rows``
    rows, default len(rows)); ``max_rows`` bounds the distinct Σ rows of a step."""
    T = len(rows) if num_rows is None else num_rows
    tiles = build_tiles(rows, cluster_of_row, none_row)
    S, R, e, d_in = len(shape.widths), shape.rank, shape.elem_bytes, shape.d_in
    D, SR = sum(shape.widths), S * R
    launch = config.launches(T, shape.clusters, max_rows, d_in, list(shape.widths), R, e)  # the kernels' grids
    split_k = launch.cfg.split_k
    n_tok, nc, ns = tiles.num_adapter_tokens, tiles.cluster_tiles.shape[0], tiles.sigma_tiles.shape[0]
    _, shrink_cols, _ = launch.shrink
    shrink = KernelCost("shrink", math.prod(launch.shrink), nc * shrink_cols * split_k, nc * d_in * SR * e, 0,
                        n_tok * d_in * e * shrink_cols + n_tok * SR * 4 * split_k)
    _, _, q_blocks = launch.sigma
    sigma_each = (R if shape.diag else R * R) * e
    sigma = KernelCost("sigma", math.prod(launch.sigma), ns * S * q_blocks, 0, ns * S * sigma_each,
                       n_tok * SR * 4 * (split_k * (1 if shape.diag else q_blocks) + 1))
    _, expand_cols = launch.expand
    expand = KernelCost("expand", math.prod(launch.expand), nc * expand_cols, nc * R * D * e, 0,
                        n_tok * R * 4 * expand_cols + 2 * n_tok * D * e)
    return [shrink, sigma, expand]


def plan_call_per_adapter(rows: np.ndarray, none_row: int, shape: LayerShape, max_segs: int,
                          num_rows: int | None = None) -> list[KernelCost]:
    """The earlier kernels (tokens grouped by adapter; grids ⌈T/16⌉ × slices × max_segs, one
    expand launch per slice, g zeroed first), for comparison."""
    T = len(rows) if num_rows is None else num_rows
    S, R, e, d_in = len(shape.widths), shape.rank, shape.elem_bytes, shape.d_in
    rows = np.asarray(rows)
    _, counts = np.unique(rows[rows != none_row], return_counts=True)
    seg_tiles = int((-(-counts // TILE_M)).sum())
    n_tok, m_tiles = int(counts.sum()), -(-T // TILE_M)
    sigma_each = (R if shape.diag else R * R) * e
    costs = [KernelCost("zero g", 1, 1, 0, 0, S * T * R * 4),
             KernelCost("shrink+sigma", m_tiles * S * max_segs, seg_tiles * S, seg_tiles * S * d_in * R * e,
                        seg_tiles * S * sigma_each, S * n_tok * (d_in * e + R * 4))]
    for d in shape.widths:
        cols = -(-d // 64)
        costs.append(KernelCost("expand", m_tiles * cols * max_segs, seg_tiles * cols, seg_tiles * R * d * e, 0,
                                n_tok * (R * 4 * cols + 2 * d * e)))
    return costs


def call_seconds(costs: list[KernelCost], bandwidth: float = H100_BANDWIDTH) -> float:
    return sum(k.seconds(bandwidth) for k in costs)
