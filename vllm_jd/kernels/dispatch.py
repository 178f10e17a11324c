"""Pick the implementation of the shared-basis LoRA branch for the device of the activations."""

from __future__ import annotations

import torch

from vllm_jd.kernels.metadata import JDMeta
from vllm_jd.kernels.torch_ops import JDLayerWeights, jd_lora_torch


def apply_jd_lora(x: torch.Tensor, y: torch.Tensor, w: JDLayerWeights, meta: JDMeta) -> None:
    """In place ``y += U Σ Vᵀ x`` per token (see ``vllm_jd.kernels``); x [T, d_in], y [T, Σ d_s]."""
    if x.is_cuda:
        from vllm_jd.kernels.triton_ops import jd_lora_triton

        jd_lora_triton(x, y, w, meta)
    else:
        jd_lora_torch(x, y, w, meta)
