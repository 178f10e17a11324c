"""Shared-basis LoRA layers: vLLM's LoRA layer classes with the weights replaced by U_c, V_c, Σ.

Each class subclasses vLLM's own (column, merged column, QKV, merged QKV, row-parallel,
replicated), so forward, bias handling and tensor-parallel communication stay vLLM's. What
changes: no ``max_loras × R × d`` slot tensors are allocated, ``set_lora`` is a no-op (an
adapter is a Σ row, see manager.py), and the LoRA branch runs shrink → sigma → expand.

Tensor parallelism shards like vLLM's LoRA: U_c is cut with the layer's output rows (column
parallel, by the class's own ``slice_lora_b``), V_c with its input columns (row parallel, by
``slice_lora_a``); Σ is replicated. For row-parallel layers every rank adds U Σ V_rᵀ x_r to its
partial output and the base layer's all-reduce sums them: U Σ Σ_r V_rᵀ x_r = U Σ Vᵀ x, exact
because every step is linear.
"""

from __future__ import annotations

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.serving.op import jd_lora_layer, register_layer
from vllm_jd.serving.state import JDState
from vllm_jd.store.errors import StoreError


class JDLayerMixin:
    """The shared-basis LoRA branch; mixed in front of a vLLM LoRA layer class."""

    jd_layer_id: int = -1

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        self.lora_config = lora_config
        self._enable_aux_cuda_stream = False  # one stream: the branch is a few small ops
        n = getattr(self, "n_slices", 1)
        # vLLM code that inspects slot tensors only reads their number and dtype
        empty = torch.zeros(0, dtype=lora_config.lora_dtype if isinstance(lora_config.lora_dtype, torch.dtype)
                            else torch.float32)
        self.lora_a_stacked = tuple(empty for _ in range(n))
        self.lora_b_stacked = tuple(empty for _ in range(n))
        if not hasattr(self, "output_slices") or self.output_slices is None:
            self.output_slices = (self.output_size,)

    def set_lora(self, index, lora_a, lora_b) -> None:  # an adapter is a Σ row, nothing to copy
        return None

    def reset_lora(self, index) -> None:
        return None

    def jd_slice_shapes(self) -> list[int]:
        """Output size of each slice on this rank."""
        return list(self.output_slices)

    def jd_full_shapes(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of each slice in the unsharded model: what a store basis must map before
        ``jd_shard`` cuts it for this rank."""
        return [(self.base_layer.input_size, self.base_layer.output_size)]

    def jd_shard(self, U: list[torch.Tensor | None], V: list[torch.Tensor | None]
                 ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """This rank's part of each slice's U [C, d_out, R] and V [C, d_in, R] (full sizes in;
        None = a slice without adapters), cut by the vLLM class's own TP slicing.

        Raises StoreError if a basis does not map the unsharded slice's dims: cutting a basis
        of another model's size could yield shards of the right size holding the wrong rows.
        """
        for s, (u, v, exp) in enumerate(zip(U, V, self.jd_full_shapes(), strict=True)):
            if u is not None and (v.shape[1], u.shape[1]) != exp:
                layer = getattr(self.base_layer, "prefix", "") or type(self.base_layer).__name__
                raise StoreError(f"store bases for {layer} (slice {s}) map {v.shape[1]}→{u.shape[1]} but the "
                                 f"unsharded layer maps {exp[0]}→{exp[1]}: the store was built for another model")
        if self.tp_size == 1:
            return U, V
        n = len(U)
        C = next(u.shape[0] for u in U if u is not None)
        Us: list[list] = [[] for _ in range(n)]
        Vs: list[list] = [[] for _ in range(n)]
        for c in range(C):
            b = [u[c] if u is not None else None for u in U]
            a = [v[c].T if v is not None else None for v in V]
            b = self.slice_lora_b(b) if n > 1 else [self.slice_lora_b(b[0])]
            a = self.slice_lora_a(a) if n > 1 else [self.slice_lora_a(a[0])]
            for s in range(n):
                Us[s].append(b[s])
                Vs[s].append(a[s].T if a[s] is not None else None)
        stack = lambda xs: torch.stack(xs) if xs[0] is not None else None  # noqa: E731
        return [stack(x) for x in Us], [stack(x) for x in Vs]

    def jd_bind(self, weights: JDLayerWeights, state: JDState) -> None:
        self.jd_layer_id = register_layer(weights, state)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.jd_layer_id < 0:
            return output
        shape = output.shape
        if x.ndim == 3:
            x, output = x.flatten(0, 1), output.flatten(0, 1)
        jd_lora_layer(x, output, self.jd_layer_id)
        return output.reshape(shape)

    def _apply_async_impl(self, x, bias=None):
        return self._apply_sync(x, bias)


class JDColumnParallelLinear(JDLayerMixin, ColumnParallelLinearWithLoRA):
    pass


class JDMergedColumnParallelLinear(JDLayerMixin, MergedColumnParallelLinearWithLoRA):
    def jd_full_shapes(self) -> list[tuple[int, int]]:
        return [(self.base_layer.input_size, d) for d in self.base_layer.output_sizes]


def _qkv_full_sizes(base) -> tuple[int, int]:
    """Unsharded (q, k = v) output sizes; the layer's ``output_sizes`` count KV heads replicated
    across ranks (tp_size > num_kv_heads), the store's bases do not."""
    return base.total_num_heads * base.head_size, base.total_num_kv_heads * base.head_size


class JDQKVParallelLinear(JDLayerMixin, QKVParallelLinearWithLoRA):
    def jd_full_shapes(self) -> list[tuple[int, int]]:
        q, kv = _qkv_full_sizes(self.base_layer)
        return [(self.base_layer.input_size, q + 2 * kv)]


class JDMergedQKVParallelLinear(JDLayerMixin, MergedQKVParallelLinearWithLoRA):
    def jd_full_shapes(self) -> list[tuple[int, int]]:
        q, kv = _qkv_full_sizes(self.base_layer)
        return [(self.base_layer.input_size, d) for d in (q, kv, kv)]


class JDRowParallelLinear(JDLayerMixin, RowParallelLinearWithLoRA):
    pass


class JDReplicatedLinear(JDLayerMixin, ReplicatedLinearWithLoRA):
    pass


JD_CLASS_FOR = {
    MergedQKVParallelLinearWithLoRA: JDMergedQKVParallelLinear,
    QKVParallelLinearWithLoRA: JDQKVParallelLinear,
    MergedColumnParallelLinearWithLoRA: JDMergedColumnParallelLinear,
    ColumnParallelLinearWithLoRA: JDColumnParallelLinear,
    RowParallelLinearWithLoRA: JDRowParallelLinear,
    ReplicatedLinearWithLoRA: JDReplicatedLinear,
}
"""vLLM LoRA class → our class. Order matters: vLLM's own selection decides which stock class
fits a layer (``can_replace_layer``), we substitute ours for it."""
