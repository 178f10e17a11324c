"""A server that must not outlive the process that started it (a Ray Serve replica).

``PR_SET_PDEATHSIG`` makes Linux send SIGKILL to a process when its parent dies. It covers only
direct children, and a vLLM server is a process tree (API server → engine core → workers: a
killed replica left ~3 GB of engine and worker processes per server behind before this), so
every process of the tree sets it: the API server when it is started, vLLM's own processes when
they load the plugin (``VLLM_JD_DIE_WITH_PARENT=1`` is inherited by all of them).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

VLLM_JD_DIE_WITH_PARENT = "VLLM_JD_DIE_WITH_PARENT"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_parent_if_asked() -> None:
    if os.environ.get(VLLM_JD_DIE_WITH_PARENT) == "1":
        die_with_parent()
