"""The ``vllm.general_plugins`` entry point; vLLM calls it in every process it starts."""

from __future__ import annotations

from vllm_jd.envs import store_path


def register() -> None:
    """Install vllm-jd into this process if a store is configured (``VLLM_JD_STORE``).

    Cheap and idempotent: with no store it returns at once and imports nothing.
    """
    if not store_path():
        return
    from vllm_jd.serving.patch import install

    install()
