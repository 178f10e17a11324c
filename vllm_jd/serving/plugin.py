"""The ``vllm.general_plugins`` entry point; vLLM calls it in every process it starts."""

from __future__ import annotations

from vllm_jd.envs import store_path
from vllm_jd.serving.lifetime import die_with_parent_if_asked


def register() -> None:
    """Install vllm-jd into this process if a store is configured (``VLLM_JD_STORE``).

    Cheap and idempotent: with no store it returns at once and imports nothing.
    """
    die_with_parent_if_asked()  # a replica's server tree goes down with the replica
    if not store_path():
        return
    from vllm_jd.serving.patch import install

    install()
