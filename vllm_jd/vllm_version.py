"""The one vLLM version vllm-jd supports, and the check every module touching vLLM internals
runs first (``serving/patch.py``, the scheduler, the prepacked CPU GEMMs of ``kernels/amx.py``).

Its own module, importing nothing of ours, so kernels and the scheduler can check without
importing the serving package.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.32.0"


def check_vllm_version(version: str | None = None) -> None:
    """Raise RuntimeError unless ``version`` (default: the installed vLLM's) is the pinned one."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version.split("+")[0] != SUPPORTED_VLLM:
        raise RuntimeError(f"vllm-jd {SUPPORTED_VLLM} patches vLLM internals and supports only vllm=={SUPPORTED_VLLM}, "
                           f"found vllm {version}; install vllm-jd's pinned vLLM (pip install 'vllm-jd[cpu]' or "
                           f"'vllm-jd[gpu]')")
