"""Environment variables read by vllm-jd (set by `vllm-jd serve`, inherited by vLLM's processes)."""

from __future__ import annotations

import os

VLLM_JD_STORE = "VLLM_JD_STORE"
"""Path of the store to serve. Unset: the plugin does nothing."""


def store_path() -> str | None:
    return os.environ.get(VLLM_JD_STORE) or None
