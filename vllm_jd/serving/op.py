"""The shared-basis LoRA branch as one registered op per call: ``vllm_jd::jd_lora_layer``.

Opaque to torch.compile (dynamo records a call, inductor compiles the rest of the model), so
vLLM's CPU backend can keep compiling the base model: it turns compilation off for stock LoRA,
which alone costs the base path about a third of its throughput on this machine. The op looks
the layer's weights and the step's metadata up by layer id, so the compiled graph holds no
per-step tensors.
"""

from __future__ import annotations

import torch

from vllm_jd.kernels.torch_ops import jd_lora_torch
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.serving.state import JDState

_LAYERS: list[tuple[JDLayerWeights, JDState]] = []


def register_layer(weights: JDLayerWeights, state: JDState) -> int:
    """Make a layer's weights reachable from the op; returns its layer id."""
    _LAYERS.append((weights, state))
    return len(_LAYERS) - 1


@torch.library.custom_op("vllm_jd::jd_lora_layer", mutates_args=("y",))
def jd_lora_layer(x: torch.Tensor, y: torch.Tensor, layer_id: int) -> None:
    """In place ``y[t] += U_c Σ_a V_cᵀ x[t]`` for the current step's adapter tokens of layer ``layer_id``.

    x: [T, d_in]; y: [T, Σ d_s]. Tokens without an adapter keep y exactly.
    """
    weights, state = _LAYERS[layer_id]
    meta = state.meta
    if meta is None:
        return
    if x.is_cuda:
        # Launched whenever the step has LoRA ids, even vLLM's warm-up adapters (whose rows are
        # "none", so no tile): the warm-up runs before each graph capture then compile and load
        # the kernels outside the capture, and the graph captured for steps with LoRA holds
        # them (replays read the tile counts from device memory). Steps without LoRA ids, and
        # vLLM's graph variant for them, skip the kernels: base traffic pays nothing.
        if meta.lora_active:
            from vllm_jd.kernels.gpu.jd_triton import jd_lora_gpu

            jd_lora_gpu(x, y, weights, meta.tiles)
    elif meta.any_adapter:
        if meta.num_tokens != x.shape[0]:
            raise RuntimeError(f"vllm-jd: the step's adapter mapping covers {meta.num_tokens} tokens but the layer "
                               f"got {x.shape[0]}")
        jd_lora_torch(x, y, weights, meta)


@jd_lora_layer.register_fake
def _jd_lora_layer_fake(x: torch.Tensor, y: torch.Tensor, layer_id: int) -> None:
    return None
