"""A whole decode step of Mistral-7B on an H100, by bytes: the base model's weights and KV cache
against the same plus our kernels on q/k/v of every layer (``plan.py``). A model, not a
measurement: it predicts the share of base-model decode throughput the GPU path keeps.

Decode is memory-bound: a step reads every weight once and each sequence's KV cache, so
step time ≈ bytes / bandwidth; the op adds its kernels' bytes and launch floors per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_jd.kernels.gpu import plan


@dataclass(frozen=True)
class DecoderShape:
    """What a decode step reads: parameters, layers, KV heads × head size, q/k/v widths."""

    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    weight_bytes: int = 2

    @property
    def qkv_widths(self) -> tuple[int, int, int]:
        kv = self.kv_heads * self.head_dim
        return self.hidden, kv, kv


MISTRAL_7B = DecoderShape(params=7.24e9, layers=32, hidden=4096, kv_heads=8, head_dim=128)


def step_rows(batch: int, adapters: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One decode token per sequence, each with an adapter drawn uniformly from ``adapters``
    spread evenly over ``clusters``; returns (rows [batch], cluster_of_row [adapters + 1])."""
    rng = np.random.default_rng(seed)
    cluster_of_row = np.append(np.arange(adapters) * clusters // adapters, 0)
    return rng.integers(0, adapters, batch), cluster_of_row


def decode_step(batch: int, context: int = 512, adapters: int = 1024, clusters: int = 8, rank: int = 16,
                kernels: str = "cluster", model: DecoderShape = MISTRAL_7B,
                bandwidth: float = plan.H100_BANDWIDTH) -> dict:
    """Predicted decode step of ``batch`` sequences at ``context`` tokens each, LoRA on q/k/v:
    base seconds, op seconds, and ``ratio`` = base / (base + op), the share of base throughput.
    ``kernels``: "cluster" (``jd_triton.py``) or "per_adapter" (the earlier kernels)."""
    rows, cluster_of_row = step_rows(batch, adapters, clusters)
    shape = plan.LayerShape(model.hidden, model.qkv_widths, rank, clusters, model.weight_bytes)
    if kernels == "cluster":
        costs = plan.plan_call(rows, cluster_of_row, adapters, shape, max_rows=batch)
    elif kernels == "per_adapter":
        costs = plan.plan_call_per_adapter(rows, adapters, shape, max_segs=batch + 1)
    else:
        raise ValueError(f"kernels={kernels!r}: expected 'cluster' or 'per_adapter'")
    kv_bytes = batch * context * model.layers * 2 * model.kv_heads * model.head_dim * model.weight_bytes
    base = (model.params * model.weight_bytes + kv_bytes) / bandwidth
    layer = plan.call_seconds(costs, bandwidth)
    qkv_gemm = (model.hidden * sum(model.qkv_widths) * model.weight_bytes) / bandwidth
    op = layer * model.layers
    return {"batch": batch, "context": context, "adapters": adapters, "clusters": clusters, "rank": rank,
            "kernels": kernels, "base_step_ms": round(base * 1e3, 3), "op_step_ms": round(op * 1e3, 3),
            "op_per_layer_us": round(layer * 1e6, 2), "qkv_gemm_per_layer_us": round(qkv_gemm * 1e6, 2),
            "programs_launched_per_layer": sum(k.launched for k in costs),
            "op_bytes_per_layer": sum(k.total_bytes for k in costs), "ratio": round(base / (base + op), 4)}
