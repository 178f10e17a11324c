"""Block sizes and split-K for the GPU kernels, chosen per shape from a small table (as vLLM's
``get_lora_op_configs``): plain rules rather than autotuning, so a CUDA graph captured for a
batch size always replays the same launches. Why each rule: ``docs/gpu.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_jd.kernels.gpu.tiles import max_cluster_tiles, max_sigma_tiles

MAX_SLICES = 4
"""Most output slices one layer may have (q/k/v packs 3, gate/up 2): the expand kernel finds a
column block's slice from up to four widths passed as scalars."""

MAX_RANK = 512
"""Largest rank the kernels take (``serve``'s limit too): Σ, shrink and expand loop over the rank
in chunks of at most 64, so shared memory does not grow with it."""

TARGET_PROGRAMS = 264
"""Two programs per SM of an H100 (132 SMs): split-K is used until the shrink launches this many."""

MAX_SPLIT_K = 16


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes for one layer call. shrink: BLOCK_N over the S·R columns of h, BLOCK_K over
    d_in, ``split_k`` partial sums over d_in of ``k_per_split`` each; sigma: BLOCK_Q output and
    BLOCK_R reduction columns of Σ; expand: BLOCK_N output columns, BLOCK_R rank chunk."""

    shrink_n: int
    shrink_k: int
    split_k: int
    k_per_split: int
    sigma_q: int
    sigma_r: int
    expand_n: int
    expand_r: int


def choose(num_rows: int, cluster_tiles: int, d_in: int, S: int, R: int, elem_bytes: int) -> KernelConfig:
    """The configuration for x with ``num_rows`` rows, at most ``cluster_tiles`` cluster tiles,
    input width ``d_in``, S slices of rank R, weights of ``elem_bytes`` bytes (2 or 4)."""
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"rank {R} is outside 1..{MAX_RANK}, the ranks the GPU kernels take")
    if not 1 <= S <= MAX_SLICES:
        raise ValueError(f"{S} output slices: the GPU kernels take 1..{MAX_SLICES}")
    shrink_n = _clamp(_pow2(S * R), 16, 128)
    shrink_k = 64 if elem_bytes == 2 else 32  # one 16 KB fp32/bf16 tile of V per step either way
    col_blocks = -(-S * R // shrink_n)
    k_blocks = -(-d_in // shrink_k)
    split = _clamp(-(-TARGET_PROGRAMS // max(cluster_tiles * col_blocks, 1)), 1, min(MAX_SPLIT_K, k_blocks))
    k_per_split = -(-k_blocks // split) * shrink_k
    split = -(-d_in // k_per_split)  # no empty split
    rank_block = _clamp(_pow2(R), 16, 64)
    return KernelConfig(shrink_n, shrink_k, split, k_per_split, rank_block, rank_block,
                        128 if elem_bytes == 2 else 64, rank_block)


@dataclass(frozen=True)
class Launches:
    """What ``jd_lora_gpu`` launches for one call: its block sizes and the three grids (static
    bounds: programs past the step's tiles return at once). ``plan.py`` counts these same grids."""

    cfg: KernelConfig
    shrink: tuple[int, int, int]  # cluster tiles × column blocks of S·R × split_k
    sigma: tuple[int, int, int]  # Σ tiles × slices × blocks of R
    expand: tuple[int, int]  # cluster tiles × column blocks of every slice


def launches(num_rows: int, num_clusters: int, max_rows: int, d_in: int, widths: list[int], R: int,
             elem_bytes: int) -> Launches:
    """``Launches`` for x with ``num_rows`` rows, a layer of ``num_clusters`` clusters, input width
    ``d_in``, output slices ``widths``, rank R; ``max_rows`` bounds a step's distinct Σ rows."""
    S = len(widths)
    ctiles = max_cluster_tiles(num_rows, num_clusters)
    cfg = choose(num_rows, ctiles, d_in, S, R, elem_bytes)
    return Launches(cfg, (ctiles, -(-S * R // cfg.shrink_n), cfg.split_k),
                    (max_sigma_tiles(num_rows, max_rows), S, -(-R // cfg.sigma_q)),
                    (ctiles, sum(-(-d // cfg.expand_n) for d in widths)))
