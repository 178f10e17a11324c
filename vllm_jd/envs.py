"""Environment variables read by vllm-jd (set by `vllm-jd serve`, inherited by vLLM's processes)."""

from __future__ import annotations

import os

VLLM_JD_STORE = "VLLM_JD_STORE"
"""Path of the store to serve. Unset: the plugin does nothing."""


def store_path() -> str | None:
    return os.environ.get(VLLM_JD_STORE) or None

VLLM_JD_ADAPTER_ROOT = "VLLM_JD_ADAPTER_ROOT"
"""Folder under which /v1/load_lora_adapter may read adapters. Unset: registration is refused."""
VLLM_JD_MAX_ERROR = "VLLM_JD_MAX_ERROR"
"""Projection error above which a registered adapter is stored exactly (default 0.5)."""
VLLM_JD_SPARE_ADAPTERS = "VLLM_JD_SPARE_ADAPTERS"
"""Σ rows each worker reserves at start for adapters registered while serving (default 256)."""


def adapter_root() -> str | None:
    return os.environ.get(VLLM_JD_ADAPTER_ROOT) or None


def max_error() -> float:
    return float(os.environ.get(VLLM_JD_MAX_ERROR) or 0.5)
